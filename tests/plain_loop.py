"""The scoring loop of docs/design.md written plainly, for tests to check the library against:
one round at a time over every image, no queue, no policies, no shared batches. The library's
loop (`runtime.algorithm.scoring.Scorer`) is what the trainers and `diffcls classify` run; this
is its independent reference on the bundled demo models (tests/test_scoring.py has another, on
the tiny models)."""

from __future__ import annotations

import torch


def timestep_grid(T: int, M: int) -> list[int]:
    return list(range(T // M // 2, T, T // M))[:M]


class AsUnet(torch.nn.Module):
    """A DiT behind the UNet call `classify_latents` makes; "embeddings" are class ids."""

    def __init__(self, model):
        super().__init__()
        self.denoiser = model.wrap("unet")  # learned sigma: only the first C channels (the noise)

    def forward(self, xt, t, encoder_hidden_states, return_dict=False):
        return (self.denoiser(xt, t, encoder_hidden_states),)


@torch.no_grad()
def classify_latents(unet, x0: torch.Tensor, embeds: torch.Tensor, alphas: torch.Tensor,
                     n_samples: list[int], to_keep: list[int], n_trials: int = 1, seed: int = 0,
                     batch_size: int = 512, sigmas: torch.Tensor | None = None,
                     weights: torch.Tensor | None = None) -> tuple[list[int], int]:
    """The fixed schedule's rounds (l2 loss) for N latents; returns (predictions, UNet evaluations).
    With `sigmas` (a flow model's σ_t, ascending): x_t = (1 - σ_t) x0 + σ_t eps, the model fed
    σ_t * T, target eps - x0. `weights`: (T,) factors on the errors (a timestep weighting)."""
    N, (C, h, w), K = x0.shape[0], x0.shape[1:], embeds.shape[0]
    T, M = alphas.shape[0], max(n_samples)
    grid = timestep_grid(T, M)
    bank = torch.randn((M * n_trials, C, h, w), generator=torch.Generator().manual_seed(seed))
    remaining = [list(range(K)) for _ in range(N)]
    err_sum = torch.zeros(N, K, dtype=torch.float64)
    err_cnt = torch.zeros(N, K, dtype=torch.float64)
    evaluated: list[int] = []
    n_evals = 0
    for n_i, k_i in zip(n_samples, to_keep):
        step = len(grid) // n_i
        ts = [t for t in grid[step // 2 :: step][:n_i] if t not in evaluated]
        first = len(evaluated)
        evaluated += ts
        jobs = [  # (image, class, t, noise index)
            (i, c, t, (first + ti) * n_trials + j)
            for i in range(N)
            for c in remaining[i]
            for ti, t in enumerate(ts)
            for j in range(n_trials)
        ]
        for s in range(0, len(jobs), batch_size):
            chunk = jobs[s : s + batch_size]
            ii = torch.tensor([j[0] for j in chunk])
            cc = torch.tensor([j[1] for j in chunk])
            tt = torch.tensor([j[2] for j in chunk])
            eps = bank[torch.tensor([j[3] for j in chunk])]
            if sigmas is None:
                a = alphas[tt].view(-1, 1, 1, 1)
                xt, target, model_t = a.sqrt() * x0[ii] + (1 - a).sqrt() * eps, eps, tt
            else:
                s = sigmas[tt].view(-1, 1, 1, 1)
                xt, target, model_t = (1 - s) * x0[ii] + s * eps, eps - x0[ii], sigmas[tt] * T
            pred = unet(xt, model_t, encoder_hidden_states=embeds[cc], return_dict=False)[0]
            err = ((target - pred) ** 2).mean(dim=(1, 2, 3)).double()
            if weights is not None:
                err = err * weights[tt]
            err_sum.index_put_((ii, cc), err, accumulate=True)
            err_cnt.index_put_((ii, cc), torch.ones_like(err), accumulate=True)
            n_evals += len(chunk)
        for i in range(N):
            scores = err_sum[i, remaining[i]] / err_cnt[i, remaining[i]]
            best = torch.topk(-scores, k=k_i).indices.tolist()
            remaining[i] = [remaining[i][b] for b in best]
    return [r[0] for r in remaining], n_evals


