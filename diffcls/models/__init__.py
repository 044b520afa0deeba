"""Model specs and loading: what a Stable Diffusion model is to diffcls.

`SDModel` holds the four parts classification needs (tokenizer, text encoder, VAE, UNet) plus the
noise schedule; `load_model` reads a diffusers directory or a single checkpoint; `tiny_model`
builds small SD-shaped models from configs for tests; `DiTModel` is a class-conditional DiT
(a `DiTPipeline` directory) with the same interface, `tiny_dit` its test-sized version; `spec`
describes each exported component once, for export, engines and runtime alike.
"""

from diffcls.models.dit import DiTModel, tiny_dit
from diffcls.models.loading import SDModel, default_model_path, load_model
from diffcls.models.spec import COMPONENTS, ComponentSpec, TensorSpec, component_specs
from diffcls.models.tiny import tiny_model

__all__ = [
    "COMPONENTS",
    "ComponentSpec",
    "DiTModel",
    "SDModel",
    "TensorSpec",
    "component_specs",
    "default_model_path",
    "load_model",
    "tiny_dit",
    "tiny_model",
]
