"""What every latent diffusion model diffcls loads derives the same way from its configs.

`SDModel` (text-conditioned UNet) and `DiTModel` (class-conditioned transformer) both hold an
AutoencoderKL as `vae` and the training schedule's ᾱ as `alphas_cumprod`; the facts read from
those live here once.
"""

from __future__ import annotations

import torch


def hash_module(h, name: str, module, config_json: str) -> None:
    """Feed one component to the sha256 `h`: its name, its config (as the caller serializes it),
    then every tensor of its state dict by sorted key, with dtype and raw bytes. Fingerprints are
    built from this, so every byte of every weight counts."""
    h.update(name.encode())
    h.update(config_json.encode())
    for key, tensor in sorted(module.state_dict().items()):
        h.update(key.encode())
        t = tensor.detach().to("cpu").contiguous()
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


class LatentDiffusionModel:
    """Mixin for model dataclasses with `vae` (diffusers AutoencoderKL) and `alphas_cumprod` (T,)."""

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def scaling_factor(self) -> float:
        return float(getattr(self.vae.config, "scaling_factor", 0.18215))

    @property
    def shift_factor(self) -> float | None:
        """The VAE config's `shift_factor` (SD3 and Flux: latents are (mean - shift) * scale), else None."""
        value = getattr(self.vae.config, "shift_factor", None)
        return None if value is None else float(value)

    def noise_tables(self, image_size: int):
        """(alphas_cumprod, sigmas or None) for images of `image_size` px: the model's own tables,
        except where the schedule depends on the image size (Flux's dynamic shift, `models.flux`)."""
        return self.alphas_cumprod, getattr(self, "sigmas", None)

    @property
    def vae_force_upcast(self) -> bool:
        """The VAE config asks to run in fp32 (`force_upcast`, true for SD's VAE: it overflows in fp16)."""
        return bool(getattr(self.vae.config, "force_upcast", False))
