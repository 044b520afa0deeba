"""Train the bundled demo DiT: a tiny class-conditional Diffusion Transformer on the digits.

    python -m diffcls.train.dit --out diffcls/models/demo-dit          # train + save + eval
    python -m diffcls.train.dit --eval --model diffcls/models/demo-dit # held-out accuracy

The paper's second system scores a class-conditional ImageNet DiT (Peebles & Xie, "Scalable
Diffusion Models with Transformers", ICCV 2023; the official `eval_prob_dit.py`). This is the
same recipe at toy scale, saved as `DiTPipeline.save_pretrained` lays a DiT out (transformer/,
vae/, scheduler/, model_index.json with `id2label`), so classifying it takes every code path a
real DiT-XL/2 takes:

- the SD demo's `AutoencoderKL` is reused as is (32x32 RGB -> 4x8x8 latent, its scaling factor);
  DiT-XL/2 likewise reuses Stable Diffusion's VAE;
- `diffusers.DiTTransformer2DModel`: patch size 2 on the 8x8 latent (16 tokens), adaLN-Zero
  conditioning on (timestep, class label), learned sigma (8 output channels: the first 4 are
  the noise prediction, the last 4 interpolate the log variance), label dropout 0.1 (DiT's
  classifier-free-guidance null class);
- DiT's noise schedule: linear betas 1e-4..0.02 over 1000 steps, epsilon prediction;
- DiT's loss: MSE on the noise + the variational bound on the learned variance with the mean
  detached (Improved DDPM's hybrid loss, as DiT trains), t ~ U{0..999}; an exponential moving
  average of the weights is what gets saved.

The inputs are exactly what `diffcls classify` computes from the PNGs `diffcls digits` writes
(`diffcls.models.digits`, shared with the SD demo's trainer). Only the train split is used;
`--eval` measures held-out accuracy with the scoring loop of docs/design.md written in plain torch.
Seeded and deterministic for a given torch version and thread count (`--threads`, default 1).
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from diffcls.models.digits import CLASSNAMES, IMAGE_SIZE
from diffcls.models.dit import DiTModel, dit_scheduler_config, save_dit_directory
from diffcls.models.loading import alphas_cumprod_from_scheduler_config, default_model_path, load_model
from diffcls.models.wrappers import VaeEncoderWrapper
from diffcls.train.demo import _log, lr_at, split_tensors, classify_in_chunks, record_evaluation, start_trainer, trainer_arguments, write_training_record


@dataclass
class DitDemoConfig:
    seed: int = 0
    image_size: int = IMAGE_SIZE  # 32 px; the SD demo's VAE makes 4x8x8 latents
    patch_size: int = 2  # DiT-XL/2's patch: 16 tokens of 2x2x4
    heads: int = 4
    head_dim: int = 24  # hidden size 96 (1152 in DiT-XL)
    layers: int = 4  # DiT blocks (28 in DiT-XL)
    learn_sigma: bool = True  # 2C output channels, as DiT
    class_dropout: float = 0.1  # DiT's label dropout (null class for guidance)
    steps: int = 2500
    batch: int = 64
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    vlb_weight: float = 1.0  # DiT: loss = mse + vb (the vb term only trains the variance)
    # default classification schedule written to diffcls.json (see training.json for what was
    # measured); the official DiT protocol is n_samples [200], to_keep [1]
    n_samples: list[int] = field(default_factory=lambda: [10, 50])
    to_keep: list[int] = field(default_factory=lambda: [3, 1])


def build_transformer(cfg: DitDemoConfig, latent_channels: int, latent_size: int, num_classes: int):
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(
        num_attention_heads=cfg.heads,
        attention_head_dim=cfg.head_dim,
        in_channels=latent_channels,
        out_channels=latent_channels * (2 if cfg.learn_sigma else 1),
        num_layers=cfg.layers,
        sample_size=latent_size,
        patch_size=cfg.patch_size,
        num_embeds_ada_norm=num_classes,
        norm_num_groups=32,
    )


# --- DiT's hybrid loss: eps MSE + variational bound on the learned variance ------------------
def _normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def vlb_terms(alphas: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-timestep constants of q(x_{t-1} | x_t, x_0) (Ho et al. 2020, Nichol & Dhariwal 2021)."""
    prev = torch.cat([torch.ones(1, dtype=alphas.dtype), alphas[:-1]])
    betas = 1 - alphas / prev
    post_var = betas * (1 - prev) / (1 - alphas)
    return {
        "log_beta": torch.log(betas),
        "post_logvar": torch.log(torch.cat([post_var[1:2], post_var[1:]])),  # clipped at t = 0
        "coef_x0": betas * prev.sqrt() / (1 - alphas),
        "coef_xt": (1 - prev) * (1 - betas).sqrt() / (1 - alphas),
    }


def hybrid_loss(out: torch.Tensor, x0, xt, eps, t, alphas, k: dict, cfg: DitDemoConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, mse): MSE on the first C channels; with learned sigma, + the bound (mean detached)."""
    C = x0.shape[1]
    pred = out[:, :C]
    mse = ((pred - eps) ** 2).mean()
    if not cfg.learn_sigma:
        return mse, mse
    v = out[:, C:]

    def at(name):
        return k[name][t].view(-1, 1, 1, 1)

    a = alphas[t].view(-1, 1, 1, 1)
    frac = (v + 1) / 2
    model_logvar = frac * at("log_beta") + (1 - frac) * at("post_logvar")
    pred_x0 = (xt - (1 - a).sqrt() * pred.detach()) / a.sqrt()
    model_mean = at("coef_x0") * pred_x0 + at("coef_xt") * xt
    true_mean = at("coef_x0") * x0 + at("coef_xt") * xt
    kl = _normal_kl(true_mean, at("post_logvar"), model_mean, model_logvar).mean(dim=(1, 2, 3)) / math.log(2.0)
    kl = torch.where(t == 0, torch.zeros_like(kl), kl)  # t = 0 is a decoder term in pixel DDPMs; skipped on latents
    return mse + cfg.vlb_weight * kl.mean(), mse


def train_transformer(model, lat: torch.Tensor, labels: torch.Tensor, alphas: torch.Tensor, cfg: DitDemoConfig,
                      gen: torch.Generator, t0: float):
    """Train on scaled latents; returns the EMA copy."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = copy.deepcopy(model).eval()
    pairs = list(zip(ema.parameters(), model.parameters()))
    k = vlb_terms(alphas)
    model.train()
    T, n = alphas.shape[0], lat.shape[0]
    running = None
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = cfg.lr * lr_at(step, cfg.steps, cfg.warmup)
        idx = torch.randint(0, n, (cfg.batch,), generator=gen)
        x0 = lat[idx]  # (B, C, h, w)
        t = torch.randint(0, T, (cfg.batch,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        out = model(xt, t, class_labels=labels[idx], return_dict=False)[0]  # (B, 2C, h, w)
        loss, mse = hybrid_loss(out, x0, xt, eps, t, alphas, k, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            d = min(cfg.ema_decay, (1 + step) / (10 + step))
            for e, p in pairs:
                e.lerp_(p, 1 - d)
        running = mse.item() if running is None else 0.98 * running + 0.02 * mse.item()
        if step % 250 == 0 or step == cfg.steps - 1:
            _log(f"dit step {step:5d}  eps mse {running:.4f}  loss {loss.item():.4f}", t0)
    return ema.requires_grad_(False)


def evaluate(model_dir: Path, split: str = "heldout", limit: int | None = None, n_samples=(10, 50), to_keep=(3, 1),
             n_trials: int = 1, seed: int = 0, chunk: int = 32, verbose: bool = True) -> dict:
    """Top-1 accuracy of the DiT directory on a digits split (plain-torch loop of docs/design.md)."""
    model = load_model(model_dir)
    x, y = split_tensors(split)
    if limit is not None:
        x, y = x[:limit], y[:limit]
    t0 = time.time()
    with torch.no_grad():
        enc = model.wrap("vae_encoder")
        lat = torch.cat([enc(x[i : i + 256]) for i in range(0, len(x), 256)])
    preds, evals = classify_in_chunks(model, lat, torch.arange(model.num_classes), y, n_samples, to_keep, n_trials, seed, chunk,
                                      t0 if verbose else None)
    dt = time.time() - t0
    correct = sum(int(a == b) for a, b in zip(preds, y.tolist()))
    return {
        "split": split, "images": len(preds), "correct": correct, "accuracy": correct / len(preds),
        "n_samples": list(n_samples), "to_keep": list(to_keep), "n_trials": n_trials, "seed": seed,
        "evals_per_image": evals / len(preds), "seconds": dt, "images_per_second": len(preds) / dt,
        "predictions": preds,
    }


def train(out: Path, cfg: DitDemoConfig, vae_dir: Path, command: str = "") -> Path:
    from diffusers import AutoencoderKL

    t0 = time.time()
    torch.manual_seed(cfg.seed)  # weights and DiT's label dropout draw from the global generator
    gen = torch.Generator().manual_seed(cfg.seed)
    vae = AutoencoderKL.from_pretrained(str(vae_dir)).eval().requires_grad_(False)
    scaling = float(vae.config.scaling_factor)
    sched = dit_scheduler_config()
    alphas = alphas_cumprod_from_scheduler_config(sched)
    x, y = split_tensors("train")
    with torch.no_grad():
        enc = VaeEncoderWrapper(vae, scaling)
        lat = torch.cat([enc(x[i : i + 256]) for i in range(0, len(x), 256)])  # (N, 4, 8, 8)
    _log(f"train split: {len(x)} images -> latents {tuple(lat.shape[1:])} (VAE from {vae_dir})", t0)
    model = build_transformer(cfg, lat.shape[1], lat.shape[2], len(CLASSNAMES))
    n_params = sum(p.numel() for p in model.parameters())
    _log(f"DiT: {n_params / 1e6:.2f} M parameters", t0)
    ema = train_transformer(model, lat, y, alphas, cfg, gen, t0)
    t_total = time.time() - t0
    save_dit_directory(DiTModel(ema, vae, alphas, dict(enumerate(CLASSNAMES))), out, sched)
    (out / "diffcls.json").write_text(
        json.dumps({"image_size": cfg.image_size, "n_samples": cfg.n_samples, "to_keep": cfg.to_keep}, indent=2) + "\n"
    )
    info = {
        "config": asdict(cfg),
        "vae": f"copied from {vae_dir.name}/ (the SD demo's VAE, unchanged)",
        "train_images": len(x),
        "parameters": n_params,
        "seconds_total": round(t_total, 1),
        "command": command or "python -m diffcls.train.dit --out diffcls/models/demo-dit",
    }
    return write_training_record(out, info, t0)


def main(argv: list[str] | None = None) -> None:
    p = trainer_arguments("python -m diffcls.train.dit", __doc__, "diffcls/models/demo-dit",
                          model_help="model dir for --eval (default: --out)", threads=1,
                          threads_help="torch CPU threads (results are exact per thread count; 1 is fastest on a shared machine)")
    p.add_argument("--vae", type=Path, default=default_model_path() / "vae", help="the AutoencoderKL to reuse")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--layers", type=int, default=None)
    args = p.parse_args(argv)

    import shlex
    import sys

    start_trainer(args.threads)
    if not args.eval:
        cfg = DitDemoConfig(seed=args.seed)
        if args.steps is not None:
            cfg.steps = args.steps
        if args.layers is not None:
            cfg.layers = args.layers
        train(args.out, cfg, args.vae, "python -m diffcls.train.dit " + shlex.join(sys.argv[1:] if argv is None else argv))
        if args.no_eval:
            return
    model_dir = args.model or args.out
    defaults = json.loads((model_dir / "diffcls.json").read_text())
    res = evaluate(model_dir, args.split, args.limit, args.n_samples or defaults["n_samples"],
                   args.to_keep or defaults["to_keep"], args.n_trials, seed=args.noise_seed)
    res.pop("predictions")
    print(json.dumps(res, indent=2))
    if not args.eval:
        record_evaluation(args.out, args.split, res)


if __name__ == "__main__":
    main()
