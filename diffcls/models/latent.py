"""What every latent diffusion model diffcls loads derives the same way from its configs.

`SDModel` (text-conditioned UNet) and `DiTModel` (class-conditioned transformer) both hold an
AutoencoderKL as `vae` and the training schedule's ᾱ as `alphas_cumprod`; the facts read from
those live here once.
"""

from __future__ import annotations


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
    def vae_force_upcast(self) -> bool:
        """The VAE config asks to run in fp32 (`force_upcast`, true for SD's VAE: it overflows in fp16)."""
        return bool(getattr(self.vae.config, "force_upcast", False))
