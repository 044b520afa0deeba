"""The forward noising process a model was trained with, read from its scheduler config.

Two families, one per-timestep table each, indexed by t = 0..T-1 (noise increasing with t):

- DDPM-type (`DDPMScheduler`, `DDIMScheduler`, ... configs): ᾱ_t (`alphas_cumprod`);
  x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) eps; the model sees t; it predicts eps ("epsilon") or
  v = sqrt(ᾱ_t) eps - sqrt(1 - ᾱ_t) x0 ("v_prediction").
- Rectified flow (`FlowMatchEulerDiscreteScheduler`, as SD3 / SD3.5 and Flux ship): σ_t
  (`sigmas`), the scheduler's own training sigmas (its `shift` applied), ascending;
  x_t = (1 - σ_t) x0 + σ_t eps; the model sees σ_t * T (the scheduler's `timesteps`); it
  predicts the velocity v = eps - x0 ("flow").

The timestep grid of the scoring loop is defined over t, so for a flow model it is a grid over
the model's own sigmas. A flow model also carries `alphas_cumprod`: the ᾱ of the same path
(x_t / sqrt((1-σ)² + σ²) is a variance-preserving sample with ᾱ = (1-σ)² / ((1-σ)² + σ²)), so
T and the fingerprint read one table for every family; scoring uses σ.

Timestep weightings (`timestep_weights`) multiply each error by w_t before it is averaged:
"none", or "logit-normal": the density of SD3's training timesteps (Esser et al. 2024, "Scaling
Rectified Flow Transformers", Sec. 3.1 and 5.1: u ~ logit-normal(m=0, s=1) over the scheduler's
index, their best setting), evaluated at the grid point u = (t + 1/2) / T and normalised to mean
1 over the T timesteps. A model trained that way is scored by the objective it was trained on.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from diffcls.errors import DiffclsError

PREDICTION_TYPES = ("epsilon", "v_prediction", "flow")
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)
# flow schedulers whose training sigmas are not the Euler scheduler's: refused, not guessed
OTHER_FLOW_SCHEDULERS = ("FlowMatchHeunDiscreteScheduler", "FlowMatchLCMScheduler")
WEIGHTINGS = ("none", "logit-normal")
# what a flow model is scored with unless its diffcls.json or --weighting says otherwise: the
# literature's training density until a weighting fitted on labelled data replaces it
FLOW_DEFAULT_WEIGHTING = "logit-normal"


def is_flow_config(config: dict) -> bool:
    return config.get("_class_name") in FLOW_SCHEDULERS


def _known(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def is_dynamic_shift(config: dict) -> bool:
    """The config shifts its sigmas by the image's token count (Flux: `use_dynamic_shifting`)."""
    return bool(config.get("use_dynamic_shifting", False))


def dynamic_shift_mu(config: dict, image_seq_len: int) -> float:
    """The shift μ a dynamic-shifting pipeline (Flux) uses for an image of `image_seq_len` latent
    tokens: linear in the token count, `base_shift` at `base_image_seq_len` tokens and
    `max_shift` at `max_image_seq_len` (extrapolated beyond), the FluxPipeline's defaults for
    keys the config lacks."""
    lo_n, hi_n = float(config.get("base_image_seq_len", 256)), float(config.get("max_image_seq_len", 4096))
    lo, hi = float(config.get("base_shift", 0.5)), float(config.get("max_shift", 1.15))
    return lo + (hi - lo) * (float(image_seq_len) - lo_n) / (hi_n - lo_n)


def flow_sigmas(config: dict, image_seq_len: int | None = None) -> torch.Tensor:
    """σ_t, t = 0..T-1 ascending (T = num_train_timesteps), float32: the training sigmas
    diffusers' FlowMatchEulerDiscreteScheduler builds from `config` (with its `shift`).

    A dynamic-shifting config (Flux) has no fixed shift: its sigmas are the scheduler's own
    unshifted t / T, shifted by the scheduler's `time_shift` with the μ the pipeline computes
    for `image_seq_len` image tokens (`dynamic_shift_mu`); such a config needs the token count."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(_known(config))
    sigmas = scheduler.sigmas
    if is_dynamic_shift(config):
        if image_seq_len is None:
            raise DiffclsError("a dynamic-shifting flow scheduler (use_dynamic_shifting, as Flux ships) shifts by the image "
                               "size; only a Flux directory is scored with one: load it as a FluxPipeline directory")
        sigmas = scheduler.time_shift(dynamic_shift_mu(config, image_seq_len), 1.0, sigmas.double())
    return sigmas.to(torch.float32).flip(0).clone()


def vp_alphas_cumprod(sigmas: torch.Tensor) -> torch.Tensor:
    """ᾱ of the flow path x_t = (1-σ) x0 + σ eps after rescaling to unit variance (float32)."""
    s = sigmas.double()
    a = (1 - s) ** 2
    return (a / (a + s**2)).float()


def noise_from_scheduler_config(config: dict, where, image_seq_len: int | None = None) -> tuple[torch.Tensor, str, torch.Tensor | None]:
    """(alphas_cumprod, prediction_type, sigmas or None) of a diffusers scheduler config; a
    scheduler or prediction type the scorer cannot score is refused in one line.
    `image_seq_len`: the image token count a dynamic-shifting (Flux) config shifts by."""
    name = config.get("_class_name")
    if name in OTHER_FLOW_SCHEDULERS or (isinstance(name, str) and name.startswith("FlowMatch") and name not in FLOW_SCHEDULERS):
        raise DiffclsError(
            f"{where}: scheduler {name} is not supported; diffcls scores flow-matching models with "
            f"{', '.join(FLOW_SCHEDULERS)}'s training sigmas, or DDPM-type schedulers (DDPM, DDIM, PNDM, Euler...)"
        )
    if is_flow_config(config):
        value = config.get("prediction_type") or "flow"
        if value != "flow":
            raise DiffclsError(
                f"{where}: a {name} model predicts the flow velocity, not {value!r}; drop prediction_type from the config"
            )
        if is_dynamic_shift(config) and image_seq_len is None:
            raise DiffclsError(f"{where}: use_dynamic_shifting (Flux's scheduler) shifts the sigmas by the image size; "
                               "diffcls scores it only in a Flux (FluxPipeline) directory; set use_dynamic_shifting false and a fixed shift otherwise")
        sigmas = flow_sigmas(config, image_seq_len)
        return vp_alphas_cumprod(sigmas), "flow", sigmas
    from diffusers import DDPMScheduler

    value = config.get("prediction_type") or "epsilon"
    if value not in PREDICTION_TYPES[:2]:
        raise DiffclsError(
            f"{where}: prediction_type {value!r} is not supported; diffcls scores models that predict "
            f"epsilon or v_prediction (DDPM-type schedulers), or flow velocity ({', '.join(FLOW_SCHEDULERS)}); "
            "set it in the scheduler config if that is what the model was trained for"
        )
    alphas = DDPMScheduler.from_config(_known(config)).alphas_cumprod.to(torch.float32).clone()
    return alphas, value, None


def noise_from_scheduler_dir(model_dir: Path) -> tuple[torch.Tensor, str, torch.Tensor | None, Path]:
    """`noise_from_scheduler_config` of a pipeline directory's scheduler/scheduler_config.json,
    plus that file's path (for the caller's messages); an unreadable file is refused in one line."""
    sched_file = Path(model_dir) / "scheduler" / "scheduler_config.json"
    try:
        config = json.loads(sched_file.read_text())
    except (OSError, ValueError) as e:
        raise DiffclsError(f"cannot read {sched_file}: {e}; it must be a diffusers scheduler config") from e
    return (*noise_from_scheduler_config(config, sched_file), sched_file)


def check_prediction_type(value: str, sigmas) -> None:
    """A model/engine set whose target the scorer knows, with σ exactly when it is a flow model."""
    if value not in PREDICTION_TYPES:
        raise DiffclsError(
            f"prediction_type {value!r} cannot be scored; the model must predict the noise (epsilon), v "
            "(v_prediction) or the flow velocity (flow), as set by its scheduler config"
        )
    if (value == "flow") != (sigmas is not None):
        raise DiffclsError("a flow model needs its sigmas (and only a flow model has them); re-export or reload the model")


def noising_coefficients(prediction_type: str, alphas_cumprod: torch.Tensor, sigmas: torch.Tensor | None):
    """Per timestep t, float32 tables (signal a_t, noise s_t, target's eps coefficient p_t, target's
    x0 coefficient q_t, the timestep the model sees): x_t = a x0 + s eps, target = p eps + q x0."""
    check_prediction_type(prediction_type, sigmas)
    T = int(alphas_cumprod.shape[0])
    if prediction_type == "flow":
        s = sigmas.to(torch.float32)
        one = torch.ones_like(s)
        return 1 - s, s, one, -one, s * T
    ac = alphas_cumprod.to(torch.float32)
    a, s = ac.sqrt(), (1.0 - ac).sqrt()
    model_t = torch.arange(T, dtype=torch.float32)
    if prediction_type == "v_prediction":
        return a, s, a, -s, model_t
    return a, s, torch.ones_like(a), torch.zeros_like(a), model_t


def timestep_weights(weighting: str, num_train_timesteps: int) -> torch.Tensor | None:
    """(T,) float64 weights with mean 1, or None for "none" (errors used as they are)."""
    if weighting not in WEIGHTINGS:
        raise DiffclsError(f"unknown --weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}")
    if weighting == "none":
        return None
    T = int(num_train_timesteps)
    u = (torch.arange(T, dtype=torch.float64) + 0.5) / T
    logit = torch.log(u / (1 - u))
    density = torch.exp(-0.5 * logit**2) / (math.sqrt(2 * math.pi) * u * (1 - u))
    return density / density.mean()
