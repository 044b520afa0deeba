"""torch modules with the exact signatures of the exported components (see `spec`).

The torch engine runs these, and ONNX export traces these, so both backends compute the same
function: text encoder -> last hidden state; VAE encoder -> scaled latent *mean* (no sampling);
UNet -> noise prediction with one timestep per sample.
"""

from __future__ import annotations

import torch

from diffcls.errors import DiffclsError


class TextEncoderWrapper(torch.nn.Module):
    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # (B, L) -> (B, L, D)
        return self.text_encoder(input_ids=input_ids, return_dict=False)[0]


class VaeEncoderWrapper(torch.nn.Module):
    """Image -> the scaled latent mean, `(mean - shift_factor) * scaling_factor` (SD3's VAE has a
    shift; SD's and DiT's have none)."""

    def __init__(self, vae, scaling_factor: float, shift_factor: float | None = None):
        super().__init__()
        self.vae = vae
        self.scaling_factor = scaling_factor
        self.shift_factor = shift_factor

    def forward(self, image: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) -> (B, C, h, w)
        moments = self.vae.quant_conv(self.vae.encoder(image)) if self.vae.quant_conv is not None else self.vae.encoder(image)
        mean = moments[:, : moments.shape[1] // 2]  # DiagonalGaussian: first half is the mean
        if self.shift_factor:
            mean = mean - self.shift_factor
        return mean * self.scaling_factor


class UNetWrapper(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:  # (B, C, h, w), (B,), (B, L, D) -> (B, C, h, w)
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


class DiTWrapper(torch.nn.Module):
    """A class-conditional DiT as the denoiser: per-sample timesteps and class ids in, noise out.

    With learned sigma the transformer returns 2C channels; the first C are the noise
    prediction (`eval_prob_dit.py` splits them off the same way), and only those leave.
    """

    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor
    ) -> torch.Tensor:  # (B, C, h, w), (B,), (B,) int64 -> (B, C, h, w)
        out = self.transformer(sample, timestep, class_labels=class_labels, return_dict=False)[0]
        return out[:, : sample.shape[1]]


class PassThrough(torch.nn.Module):
    """The prompt encoder of a class-conditional model: a prompt already is its class id."""

    def forward(self, class_ids: torch.Tensor) -> torch.Tensor:  # (B,) int64 -> (B,) int64
        return class_ids.clone()


def sd_module(model, component: str) -> torch.nn.Module:
    """The wrapped modules of a Stable Diffusion model (`SDModel.wrap`)."""
    if component == "text_encoder":
        return TextEncoderWrapper(model.text_encoder)
    if component == "vae_encoder":
        return VaeEncoderWrapper(model.vae, model.scaling_factor)
    if component == "unet":
        return UNetWrapper(model.unet)
    raise DiffclsError(f"unknown component {component!r}; choose text_encoder, vae_encoder or unet")


def wrap(model, component: str) -> torch.nn.Module:
    """The torch module that computes `component` with its spec's signature (the model says which)."""
    return model.wrap(component)
