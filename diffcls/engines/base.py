"""The engine contract shared by every backend.

An `Engine` runs one component (see `diffcls.models.spec`) at one of a fixed set of batch sizes
(`batch_sizes is None` means any). It takes and returns torch tensors keyed by the spec's names,
owns its device memory, and refuses a batch size it was not built for. The runtime packs work
into full batches and pads the tail; engines never pad.

An `EngineSet` is what the runtime needs to classify: the three engines plus the tokenizer and
the noise schedule, whatever backend produced them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from diffcls.errors import DiffclsError
from diffcls.models.spec import ComponentSpec


@runtime_checkable
class Engine(Protocol):
    component: str
    spec: ComponentSpec
    batch_sizes: tuple[int, ...] | None  # None: any batch size
    device: torch.device
    dtype: torch.dtype  # floating dtype of its float inputs/outputs

    def __call__(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...


def check_batch(engine: Engine, feed: dict[str, torch.Tensor]) -> int:
    """The feed's batch size, after checking names and that the engine was built for it."""
    names = engine.spec.input_names
    if sorted(feed) != sorted(names):
        raise DiffclsError(
            f"the {engine.component} engine takes inputs {names}, got {sorted(feed)}; key the feed by those "
            "names (diffcls.models.spec lists each component's inputs)"
        )
    batch = int(feed[names[0]].shape[0])
    if engine.batch_sizes is not None and batch not in engine.batch_sizes:
        raise DiffclsError(
            f"the {engine.component} engine was built for batch sizes "
            f"{', '.join(map(str, engine.batch_sizes))}, not {batch}; pass --batch-size with one of "
            f"those or re-export with --batch-sizes including {batch}"
        )
    return batch


class PassThroughEngine:
    """A component with nothing to run (`spec.exported` is False): its output is its input.

    A class-conditional model's prompt encoder is one: a prompt already is its class id.
    """

    def __init__(self, spec: ComponentSpec, device: torch.device | None = None):
        self.component = spec.name
        self.spec = spec
        self.batch_sizes = None
        self.device = device or torch.device("cpu")
        self.dtype = torch.float32
        self.calls = 0

    def __call__(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        check_batch(self, feed)
        self.calls += 1
        return {self.spec.output_names[0]: feed[self.spec.input_names[0]].clone()}


@dataclass
class EngineSet:
    """Everything the scoring runtime needs, independent of the backend."""

    text_encoder: Engine
    vae_encoder: Engine
    unet: Engine
    tokenizer: object
    alphas_cumprod: torch.Tensor  # (T,) float32, on CPU
    image_size: int
    latent_shape: tuple[int, int, int]  # (C, h, w)
    max_length: int
    fingerprint: str  # of the model the engines were built from
    backend: str
    precision: str  # "fp32" or "fp16"
    device: torch.device
    info: dict = field(default_factory=dict)  # backend details for `info` / `profile`
    prediction_type: str = "epsilon"  # what the UNet predicts: "epsilon", "v_prediction" or "flow"
    sigmas: torch.Tensor | None = None  # (T,) float32 σ_t of a flow-matching model, on CPU (models.noising)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """Pad/truncate every prompt to the tokenizer's max length (77 for SD) -> (P, L) int64;
        a class-conditional model's `LabelTokenizer` gives its class ids, (P,) int64."""
        ids = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return ids.to(torch.int64)
