"""The paper's evaluation loop, written plainly: the baseline `bench_speed.py` measures against.

Li et al., "Your Diffusion Model is Secretly a Zero-Shot Classifier" (ICCV 2023). Their
`eval_prob_adaptive` classifies ONE image at a time: per round it lists the (prompt, t, noise
index) triples of the remaining prompts (prompt-major, then t, then trial), cuts that list into
UNet batches of `batch_size` (the last one partial), runs the eager UNet on each batch and
reduces every sample to its error at once. No batch is shared between images or rounds.

Same definitions as docs/design.md ("The scoring loop"): timestep grid, noise bank indexing, error =
mean over (C, H, W) of the loss. One deliberate difference from the paper's fp16 code: noising
and the loss run in float32 and only the UNet input is cast to the model's dtype, exactly as
diffcls does, so that the two implementations' errors can be compared one for one. The UNet
time, which is what this baseline is for, is unchanged by that.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class RefResult:
    prediction: int  # prompt index
    errors: dict[tuple[int, int, int], float]  # (prompt, t, trial) -> error
    n_evals: int
    unet_calls: int
    unet_seconds: float  # device-synchronized time inside UNet batches
    batch_sizes: list[int] = field(default_factory=list)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _loss(eps: torch.Tensor, pred: torch.Tensor, loss: str) -> torch.Tensor:
    pred = pred.float()
    if loss == "l2":
        e = F.mse_loss(eps, pred, reduction="none")
    elif loss == "l1":
        e = F.l1_loss(eps, pred, reduction="none")
    elif loss == "huber":
        e = F.huber_loss(eps, pred, reduction="none", delta=1.0)
    else:
        raise ValueError(loss)
    return e.mean(dim=(1, 2, 3))  # (B,)


@torch.inference_mode()
def encode_prompts(text_encoder, tokenizer, prompts: list[str], max_length: int, device, chunk: int = 100) -> torch.Tensor:
    """(P, L, D) last hidden states, 100 prompts per batch as the paper's script does."""
    ids = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True, return_tensors="pt").input_ids
    out = [text_encoder(input_ids=ids[i : i + chunk].to(device))[0] for i in range(0, len(prompts), chunk)]
    return torch.cat(out)


@torch.inference_mode()
def encode_image(vae, pixels: torch.Tensor, scaling_factor: float, dtype: torch.dtype, device) -> torch.Tensor:
    """(3, S, S) in [-1, 1] -> (C, h, w) float32 latent: `latent_dist.mean * scaling_factor`."""
    x0 = vae.encode(pixels[None].to(device, dtype)).latent_dist.mean * scaling_factor
    return x0[0].float()


@torch.inference_mode()
def classify_one(
    unet,
    x0: torch.Tensor,  # (C, h, w) float32 on device
    text_embeds: torch.Tensor,  # (P, L, D) on device, the UNet's dtype
    alphas_cumprod: torch.Tensor,  # (T,) float32
    noise_bank: torch.Tensor,  # (M * n_trials, C, h, w) float32 on device
    n_samples: tuple[int, ...],
    to_keep: tuple[int, ...],
    n_trials: int = 1,
    loss: str = "l2",
    batch_size: int = 32,
) -> RefResult:
    device = x0.device
    dtype = text_embeds.dtype
    ac = alphas_cumprod.to(device, torch.float32)
    T = int(ac.shape[0])
    M = max(n_samples)
    grid = list(range(T // M // 2, T, T // M))[:M]
    remaining = list(range(int(text_embeds.shape[0])))
    evaluated: list[int] = []  # timesteps in evaluation order; position = k
    errors: dict[tuple[int, int, int], float] = {}
    sums: dict[int, float] = {}
    counts: dict[int, int] = {}
    unet_calls, unet_seconds, sizes = 0, 0.0, []
    for n, keep in zip(n_samples, to_keep):
        step = len(grid) // n
        new_ts = [t for t in grid[step // 2 :: step][:n] if t not in evaluated]
        first_k = len(evaluated)
        evaluated.extend(new_ts)
        # the paper's flat lists: prompt-major, then timestep, then trial
        work = [
            (c, t, (first_k + i) * n_trials + j)
            for c in remaining
            for i, t in enumerate(new_ts)
            for j in range(n_trials)
        ]
        for start in range(0, len(work), batch_size):
            chunk = work[start : start + batch_size]
            cs = torch.tensor([w[0] for w in chunk], device=device)
            ts = torch.tensor([w[1] for w in chunk], device=device)
            eps = noise_bank[torch.tensor([w[2] for w in chunk], device=device)]  # (B, C, h, w)
            x_t = ac[ts].sqrt().view(-1, 1, 1, 1) * x0 + (1 - ac[ts]).sqrt().view(-1, 1, 1, 1) * eps
            _sync(device)
            t0 = time.perf_counter()
            pred = unet(x_t.to(dtype), ts.to(dtype), encoder_hidden_states=text_embeds[cs]).sample
            err = _loss(eps, pred, loss).tolist()  # syncs
            unet_seconds += time.perf_counter() - t0
            unet_calls += 1
            sizes.append(len(chunk))
            for (c, t, noise_idx), e in zip(chunk, err):
                errors[(c, t, noise_idx % n_trials)] = e
                sums[c] = sums.get(c, 0.0) + e
                counts[c] = counts.get(c, 0) + 1
        remaining = sorted(remaining, key=lambda c: (sums[c] / counts[c], c))[:keep]
    assert len(remaining) == 1
    return RefResult(remaining[0], errors, len(errors), unet_calls, unet_seconds, sizes)
