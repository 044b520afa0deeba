"""One description per exported component: input/output names, dtypes and shapes.

Export, every engine backend and the runtime read these; nothing else spells a tensor name.
Shapes use "B" for the batch dimension. Output names differ from input names (`out_sample`).

Three roles, whatever the model: the prompt encoder ("text_encoder"), the VAE encoder and the
denoiser ("unet"). The denoiser's `condition` names the input fed with the prompt encoder's
output: text embeddings (`encoder_hidden_states`, float) for Stable Diffusion, class ids
(`class_labels`, int64) for a class-conditional DiT, whose prompt encoder is a pass-through
(`exported=False`: a prompt already is its class id, nothing is exported or built for it).
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

    def to_json(self) -> list:
        return [self.name, self.dtype, list(self.shape)]

    @classmethod
    def from_json(cls, data) -> "TensorSpec":
        name, dtype, shape = data
        return cls(str(name), str(dtype), tuple(d if d == "B" else int(d) for d in shape))


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    condition: str | None = None  # the input fed with the prompt encoder's output (denoiser only)
    exported: bool = True  # False: a pass-through with nothing to export (a DiT's class ids)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def shape_dict(self, batch: int) -> dict[str, tuple[int, ...]]:
        return {t.name: t.concrete(batch) for t in (*self.inputs, *self.outputs)}

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    def to_json(self) -> dict:
        return {
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
            "condition": self.condition,
            "exported": self.exported,
        }

    @classmethod
    def from_json(cls, name: str, data: dict) -> "ComponentSpec":
        return cls(
            name,
            inputs=tuple(TensorSpec.from_json(t) for t in data["inputs"]),
            outputs=tuple(TensorSpec.from_json(t) for t in data["outputs"]),
            condition=data.get("condition"),
            exported=bool(data.get("exported", True)),
        )


def exported_components(specs: dict[str, ComponentSpec]) -> list[str]:
    """The components that have a network to export, build and load, in role order."""
    return [name for name, s in specs.items() if s.exported]


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
            condition="encoder_hidden_states",
        ),
    }


def packed_component_specs(
    *, ids_length: int, emb_length: int, hidden_size: int, image_size: int, latent_shape: tuple[int, int, int]
) -> dict[str, ComponentSpec]:
    """Models whose prompt encoder packs more than one tensor into its output (SD3: the text
    embeddings and, as one more row, the pooled projection): `ids_length` token ids in,
    `emb_length` rows of width `hidden_size` out; otherwise the Stable Diffusion roles."""
    out = component_specs(max_length=ids_length, hidden_size=hidden_size, image_size=image_size, latent_shape=latent_shape)
    te, unet = out["text_encoder"], out["unet"]
    emb = TensorSpec("encoder_hidden_states", "float", ("B", emb_length, hidden_size))
    out["text_encoder"] = ComponentSpec("text_encoder", te.inputs, (TensorSpec("last_hidden_state", "float", emb.shape),))
    out["unet"] = ComponentSpec("unet", (unet.inputs[0], unet.inputs[1], emb), unet.outputs, condition=unet.condition)
    return out


def dit_component_specs(*, image_size: int, latent_shape: tuple[int, int, int]) -> dict[str, ComponentSpec]:
    """A class-conditional DiT: prompts are class ids; the denoiser takes them as `class_labels`.

    The denoiser's output is the noise prediction only (the first C of a learned-sigma DiT's 2C
    channels), so the runtime sees the same `out_sample` as from a UNet.
    """
    C, h, w = latent_shape
    S = image_size
    return {
        "text_encoder": ComponentSpec(
            "text_encoder",
            inputs=(TensorSpec("class_ids", "int64", ("B",)),),
            outputs=(TensorSpec("class_labels_out", "int64", ("B",)),),
            exported=False,
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
                TensorSpec("class_labels", "int64", ("B",)),  # per-sample class ids
            ),
            outputs=(TensorSpec("out_sample", "float", ("B", C, h, w)),),
            condition="class_labels",
        ),
    }


def model_component_specs(model, image_size: int) -> dict[str, ComponentSpec]:
    """The model's own description (`SDModel` and `DiTModel` both provide `component_specs`)."""
    return model.component_specs(image_size)
