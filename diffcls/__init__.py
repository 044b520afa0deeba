"""diffcls: zero-shot image classification with Stable Diffusion, made fast.

Implements "Your Diffusion Model is Secretly a Zero-Shot Classifier" (Li, Prabhudesai, Duggal,
Brown, Pathak; ICCV 2023, arXiv 2303.16203) against exported engines.
"""

from diffcls.errors import DiffclsError

__version__ = "0.1.0"

__all__ = ["DiffclsError", "Classifier", "ClassifyJob", "JobSpec", "Schedule", "AdaptiveSchedule", "__version__"]


def __getattr__(name):  # lazy: `import diffcls` must not import torch-heavy modules eagerly
    if name in ("Classifier", "ClassifyJob"):  # with the engines the CLI would choose (diffcls.api)
        from diffcls import api

        return getattr(api, name)
    if name == "JobSpec":
        from diffcls.runtime.execution.spec import JobSpec

        return JobSpec
    if name in ("Schedule", "AdaptiveSchedule"):
        from diffcls.runtime.algorithm import schedule

        return getattr(schedule, name)
    raise AttributeError(name)
