"""One description per exported component: input/output names, dtypes and shapes.

Export, every engine backend and the runtime read these; nothing else spells a tensor name.
Shapes use "B" for the batch dimension. Output names differ from input names (`out_sample`).
"""

from __future__ import annotations

from dataclasses import dataclass

COMPONENTS = ("text_encoder", "vae_encoder", "unet")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # "int64" or "float" (float = the component's precision)
    shape: tuple  # ints, with "B" for the batch dimension

    def concrete(self, batch: int) -> tuple[int, ...]:
        return tuple(batch if d == "B" else int(d) for d in self.shape)


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def shape_dict(self, batch: int) -> dict[str, tuple[int, ...]]:
        return {t.name: t.concrete(batch) for t in (*self.inputs, *self.outputs)}


def component_specs(
    *, max_length: int, hidden_size: int, image_size: int, latent_shape: tuple[int, int, int]
) -> dict[str, ComponentSpec]:
    """Specs for one model at one image size. `latent_shape` = (C, h, w)."""
    C, h, w = latent_shape
    L, D, S = max_length, hidden_size, image_size
    return {
        "text_encoder": ComponentSpec(
            "text_encoder",
            inputs=(TensorSpec("input_ids", "int64", ("B", L)),),
            outputs=(TensorSpec("last_hidden_state", "float", ("B", L, D)),),
        ),
        "vae_encoder": ComponentSpec(
            "vae_encoder",
            inputs=(TensorSpec("image", "float", ("B", 3, S, S)),),
            outputs=(TensorSpec("latent", "float", ("B", C, h, w)),),
        ),
        "unet": ComponentSpec(
            "unet",
            inputs=(
                TensorSpec("sample", "float", ("B", C, h, w)),
                TensorSpec("timestep", "float", ("B",)),  # per-sample timesteps
                TensorSpec("encoder_hidden_states", "float", ("B", L, D)),
            ),
            outputs=(TensorSpec("out_sample", "float", ("B", C, h, w)),),
        ),
    }


def model_component_specs(model, image_size: int) -> dict[str, ComponentSpec]:
    return component_specs(
        max_length=model.max_length,
        hidden_size=model.hidden_size,
        image_size=image_size,
        latent_shape=model.latent_shape(image_size),
    )
