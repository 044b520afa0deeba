"""Train the bundled demo model: a small Stable Diffusion on scikit-learn's digits, from scratch.

    python -m diffcls.train.demo --out diffcls/models/demo          # train + save + eval
    python -m diffcls.train.demo --eval --model diffcls/models/demo # held-out accuracy

The model has Stable Diffusion's structure and diffusers layout, so classifying with it takes
every code path a real SD model takes: a CLIP tokenizer (vocabulary built offline, the prompt
words are single tokens), `transformers.CLIPTextModel`, `diffusers.AutoencoderKL` (32x32 RGB ->
4x8x8 latent, 3 blocks) and `diffusers.UNet2DConditionModel` with cross-attention on the text,
under SD's DDPM noise schedule (scaled_linear betas 0.00085..0.012, 1000 steps, epsilon).

Training, in the order SD was built:
1. the VAE, alone: reconstruction MSE + a small KL weight (as SD's KL-f8, without the GAN);
   then `scaling_factor` = 1 / std of the latent means over the training set (SD's 0.18215 was
   chosen the same way), and the scaled latent means of every training image, computed once;
2. the UNet and the text encoder together on those frozen latents with the standard
   epsilon-prediction loss at t ~ U{0..999}; an exponential moving average of the weights is
   what gets saved.

The inputs are exactly what `diffcls classify` computes from the PNGs `diffcls digits` writes:
`preprocess_image(render_digit(d), 32, "bicubic")` (see `diffcls.models.digits`). Only the
train split is used; `--eval` measures the held-out split with the scoring loop of docs/design.md
(timestep grid, one seeded noise bank, per-round pruning), written out here in plain torch so
that the model can be measured independently of the runtime.

Seeded and deterministic (`torch.use_deterministic_algorithms`) for a given torch version and
thread count (`--threads`, default 2; float reductions are ordered per thread count).
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from diffcls.models.digits import CLASSNAMES, IMAGE_SIZE, load_split, render_digit
from diffcls.models.loading import SDModel, load_model
from diffcls.models.tiny import TinyConfig, save_model, sd_unet, sd_vae
from diffcls.models.tiny import scheduler_config as sd_scheduler_config
from diffcls.models.tokenizer import build_tokenizer_files
from diffcls.models.wrappers import VaeEncoderWrapper
from diffcls.runtime.data.preprocess import preprocess_image

PROMPT_TEMPLATE = "a handwritten digit {}"  # + the class name: "a handwritten digit three"
PROMPT_WORDS = ["a", "handwritten", "digit", *CLASSNAMES]  # single tokens in the vocabulary


@dataclass
class DemoConfig:
    seed: int = 0
    image_size: int = IMAGE_SIZE  # 32 px; 8x8 digits upscaled 4x
    latent_channels: int = 4  # as in SD
    vae_channels: tuple[int, ...] = (16, 32, 32)  # 3 blocks: 32 px -> 8x8 latent (factor 4)
    unet_channels: tuple[int, ...] = (32, 64, 64)  # 8x8 -> 4x4 -> 2x2
    unet_heads: int = 4  # attention heads per transformer block
    hidden_size: int = 64  # text embedding width D (1024 in SD 2.x)
    text_layers: int = 2
    max_length: int = 77  # tokens, as in SD
    # VAE
    vae_steps: int = 1000  # ~2.5 min on 2 cores; held-out reconstruction MSE ~1e-3 (in [-1, 1])
    vae_batch: int = 32
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6  # on the summed KL vs a per-pixel-mean MSE: a light pull to N(0, 1)
    # UNet + text encoder
    unet_steps: int = 2000  # ~10 min on 2 cores (~90 epochs of the 1,438 training latents)
    unet_batch: int = 64
    unet_lr: float = 1e-3
    text_lr: float = 1e-4
    warmup: int = 100
    ema_decay: float = 0.999
    # default classification schedule written to diffcls.json: 10 timesteps for all 10 classes,
    # then 50 (40 new) for the best 3 -> 220 UNet evaluations per image. On the 359 held-out
    # digits it scored 358/357/357 (noise seeds 0/1/2), the same as 20,100 -> 3,1 (357/357/357)
    # at half the cost; 5,20 -> 3,1 (95 evals) still got 356.
    n_samples: list[int] = field(default_factory=lambda: [10, 50])
    to_keep: list[int] = field(default_factory=lambda: [3, 1])


def scheduler_config() -> dict:
    return sd_scheduler_config(TinyConfig())  # scaled_linear, 0.00085..0.012, 1000, epsilon


def prompts() -> list[tuple[str, str, int]]:
    return [(PROMPT_TEMPLATE.format(name), name, i) for i, name in enumerate(CLASSNAMES)]


# --- data ------------------------------------------------------------------------------------
def split_tensors(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N, 3, 32, 32) in [-1, 1], labels (N,)) exactly as the classifier sees the PNGs."""
    images, labels = load_split(split)
    x = torch.stack([preprocess_image(render_digit(d), IMAGE_SIZE, "bicubic") for d in images])
    return x, torch.from_numpy(labels)


# --- model -----------------------------------------------------------------------------------
def build_components(cfg: DemoConfig, tokenizer):
    """(text_encoder, vae, unet), randomly initialised from the current torch seed."""
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab = tokenizer.get_vocab()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.hidden_size * 4,
            num_hidden_layers=cfg.text_layers,
            num_attention_heads=4,
            max_position_embeddings=cfg.max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    vae = sd_vae(cfg.vae_channels, cfg.latent_channels, cfg.image_size)
    unet = sd_unet(cfg.unet_channels, cfg.latent_channels, cfg.image_size // 2 ** (len(cfg.vae_channels) - 1),
                   cfg.hidden_size, cfg.unet_heads)
    return text_encoder, vae, unet


def lr_at(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 0 (a factor on the base learning rate)."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _log(msg: str, t0: float) -> None:
    print(f"[{time.time() - t0:7.1f}s] {msg}", flush=True)


def train_vae(vae, x: torch.Tensor, cfg: DemoConfig, gen: torch.Generator, t0: float) -> None:
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    vae.train()
    n = x.shape[0]
    for step in range(cfg.vae_steps):
        for g in opt.param_groups:
            g["lr"] = cfg.vae_lr * lr_at(step, cfg.vae_steps, cfg.warmup)
        idx = torch.randint(0, n, (cfg.vae_batch,), generator=gen)
        batch = x[idx]  # (B, 3, 32, 32)
        post = vae.encode(batch).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        rec = F.mse_loss(recon, batch)
        kl = post.kl().mean()  # summed over the latent's elements, as in SD
        loss = rec + cfg.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 250 == 0 or step == cfg.vae_steps - 1:
            _log(f"vae step {step:5d}  recon mse {rec.item():.5f}  kl {kl.item():.1f}", t0)
    vae.eval().requires_grad_(False)


@torch.no_grad()
def latent_means(vae, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Unscaled VAE posterior means (N, C, h, w)."""
    return torch.cat([vae.encode(x[i : i + batch]).latent_dist.mean for i in range(0, len(x), batch)])


@torch.no_grad()
def text_embeddings(tokenizer, text_encoder, texts: list[str]) -> torch.Tensor:
    ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    return text_encoder(input_ids=ids, return_dict=False)[0]  # (K, 77, D)


class EpsilonObjective:
    """DDPM noising with the epsilon target: t ~ U{0..T-1}, x_t = sqrt(ᾱ_t) x0 + sqrt(1-ᾱ_t) eps.
    (`diffcls.train.flow.FlowObjective` is the rectified-flow counterpart.)"""

    def __init__(self, alphas: torch.Tensor):
        self.alphas = alphas
        self.T = int(alphas.shape[0])

    def sample_t(self, batch: int, gen: torch.Generator) -> torch.Tensor:
        return torch.randint(0, self.T, (batch,), generator=gen)

    def noise(self, x0, t, eps):
        """(x_t, the target, the timestep the model sees)."""
        a = self.alphas[t].view(-1, 1, 1, 1)
        return a.sqrt() * x0 + (1 - a).sqrt() * eps, eps, t


class FlowObjective:
    """Rectified flow as SD3 trains it: u ~ logit-normal(0, 1), the index i = floor(u T) into the
    scheduler's descending sigmas (here t = T-1-i, ascending), x_t = (1 - σ_t) x0 + σ_t eps,
    target v = eps - x0, the model sees σ_t * T (the scheduler's timestep)."""

    def __init__(self, sigmas: torch.Tensor):
        self.sigmas = sigmas.to(torch.float32)  # ascending (models.noising.flow_sigmas)
        self.T = int(sigmas.shape[0])

    def sample_t(self, batch: int, gen: torch.Generator) -> torch.Tensor:
        u = torch.sigmoid(torch.randn((batch,), generator=gen))
        i = (u * self.T).long().clamp(max=self.T - 1)
        return self.T - 1 - i

    def noise(self, x0, t, eps):
        s = self.sigmas[t].view(-1, 1, 1, 1)
        return (1 - s) * x0 + s * eps, eps - x0, self.sigmas[t] * self.T


def train_unet(unet, text_encoder, tokenizer, lat: torch.Tensor, labels: torch.Tensor, alphas: torch.Tensor,
               cfg: DemoConfig, gen: torch.Generator, t0: float, condition=None, extra_loss=None, objective=None):
    """Train on scaled latents; returns EMA copies (unet, text_encoder).

    `condition(text_encoder, idx)` -> (B, 77, D): the text embeddings of the training rows `idx`
    (default: the digit prompts, indexed by `labels`). `extra_loss(unet, text_encoder, idx, xt, t,
    eps, pred)`, if given, is added to the denoising loss (the shapes demo's hard negatives).
    `objective`: the noising and target (default: `EpsilonObjective(alphas)`)."""
    objective = objective or EpsilonObjective(alphas)
    if condition is None:
        texts = [p for p, _, _ in prompts()]
        ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids

        def condition(te, idx):
            return te(input_ids=ids, return_dict=False)[0][labels[idx]]  # all 10 classes once, then (B, 77, D)
    opt = torch.optim.AdamW(
        [
            {"params": list(unet.parameters()), "lr": cfg.unet_lr, "base": cfg.unet_lr},
            {"params": list(text_encoder.parameters()), "lr": cfg.text_lr, "base": cfg.text_lr},
        ],
        weight_decay=0.01,
    )
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    ema_pairs = [
        (e, p)
        for ema, live in ((ema_unet, unet), (ema_text, text_encoder))
        for e, p in zip(ema.parameters(), live.parameters())
    ]
    unet.train()
    text_encoder.train()
    n = lat.shape[0]
    running = None
    for step in range(cfg.unet_steps):
        f = lr_at(step, cfg.unet_steps, cfg.warmup)
        for g in opt.param_groups:
            g["lr"] = g["base"] * f
        idx = torch.randint(0, n, (cfg.unet_batch,), generator=gen)
        x0 = lat[idx]  # (B, C, h, w)
        t = objective.sample_t(cfg.unet_batch, gen)
        eps = torch.randn(x0.shape, generator=gen)
        xt, target, model_t = objective.noise(x0, t, eps)
        pred = unet(xt, model_t, encoder_hidden_states=condition(text_encoder, idx), return_dict=False)[0]
        loss = F.mse_loss(pred, target)
        if extra_loss is not None:
            loss = loss + extra_loss(unet, text_encoder, idx, xt, t, eps, pred)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            d = min(cfg.ema_decay, (1 + step) / (10 + step))
            for e, p in ema_pairs:
                e.lerp_(p, 1 - d)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 250 == 0 or step == cfg.unet_steps - 1:
            _log(f"unet step {step:5d}  loss {running:.4f}", t0)
    return ema_unet.requires_grad_(False), ema_text.requires_grad_(False)


# --- evaluation: the library's scoring loop (classify_in_chunks, below) --------------------------
def timestep_grid(T: int, M: int) -> list[int]:
    """The paper's grid of M timesteps out of T (docs/design.md); the shapes trainer's paired errors use it."""
    return list(range(T // M // 2, T, T // M))[:M]


def evaluate(model, split: str = "heldout", limit: int | None = None, n_samples=(20, 100), to_keep=(3, 1),
             n_trials: int = 1, seed: int = 0, chunk: int = 32, verbose: bool = True, weighting: str = "none") -> dict:
    """Top-1 accuracy of `model` (an SDModel) on a digits split with the adaptive schedule."""
    x, y = split_tensors(split)
    if limit is not None:
        x, y = x[:limit], y[:limit]
    t0 = time.time()
    with torch.no_grad():
        enc = VaeEncoderWrapper(model.vae, model.scaling_factor)
        lat = torch.cat([enc(x[i : i + 256]) for i in range(0, len(x), 256)])
        embeds = text_embeddings(model.tokenizer, model.text_encoder, [p for p, _, _ in prompts()])
    preds, evals = classify_in_chunks(model, lat, embeds, y, n_samples, to_keep, n_trials, seed, chunk, t0 if verbose else None,
                                      weighting=weighting)
    dt = time.time() - t0
    correct = sum(int(a == b) for a, b in zip(preds, y.tolist()))
    return {
        "split": split,
        "images": len(preds),
        "correct": correct,
        "accuracy": correct / len(preds),
        "n_samples": list(n_samples),
        "to_keep": list(to_keep),
        "n_trials": n_trials,
        "seed": seed,
        "unet_evals_per_image": evals / len(preds),
        "seconds": dt,
        "images_per_second": len(preds) / dt,
        "predictions": preds,
    }


# --- training entry point --------------------------------------------------------------------
def train_vae_and_scale(vae, x: torch.Tensor, cfg, gen, t0: float) -> tuple[torch.Tensor, float]:
    """Train the VAE on `x`, then set `scaling_factor` = 1 / std of the latent means (as SD chose
    its 0.18215); returns the scaled latent means of `x` (what the UNet trains on) and the factor."""
    train_vae(vae, x, cfg, gen, t0)
    means = latent_means(vae, x)
    scaling = float(1.0 / means.std())
    vae.register_to_config(scaling_factor=scaling)
    lat = means * scaling
    _log(f"vae done; scaling_factor {scaling:.5f}; latent {tuple(lat.shape[1:])}", t0)
    return lat, scaling


def train(out: Path, cfg: DemoConfig, command: str = "", sched: dict | None = None, defaults: dict | None = None) -> Path:
    """Train and save the demo; `sched` (default: SD's DDPM config) decides the objective (a
    FlowMatchEulerDiscreteScheduler config: rectified flow), `defaults` go into diffcls.json."""
    from transformers import CLIPTokenizer

    from diffcls.models.noising import noise_from_scheduler_config

    t0 = time.time()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = CLIPTokenizer.from_pretrained(str(build_tokenizer_files(out / "tokenizer", PROMPT_WORDS, cfg.max_length)))
    text_encoder, vae, unet = build_components(cfg, tokenizer)
    sched = sched or scheduler_config()
    alphas, prediction_type, sigmas = noise_from_scheduler_config(sched, "the demo's scheduler config")

    x, y = split_tensors("train")
    _log(f"train split: {len(x)} images {tuple(x.shape[1:])}", t0)
    lat, scaling = train_vae_and_scale(vae, x, cfg, gen, t0)
    t_vae = time.time() - t0

    objective = FlowObjective(sigmas) if prediction_type == "flow" else EpsilonObjective(alphas)
    ema_unet, ema_text = train_unet(unet, text_encoder, tokenizer, lat, y, alphas, cfg, gen, t0, objective=objective)
    t_total = time.time() - t0
    model = SDModel(tokenizer=tokenizer, text_encoder=ema_text, vae=vae, unet=ema_unet, alphas_cumprod=alphas,
                    prediction_type=prediction_type, sigmas=sigmas)
    save_model(model, out, sched)
    with open(out / "prompts.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["prompt", "classname", "classidx"])
        w.writerows(prompts())
    (out / "diffcls.json").write_text(
        json.dumps(
            {"image_size": cfg.image_size, "prompts": "prompts.csv", "n_samples": cfg.n_samples, "to_keep": cfg.to_keep,
             **(defaults or {})},
            indent=2,
        )
        + "\n"
    )
    info = {
        "config": asdict(cfg),
        "train_images": len(x),
        "scaling_factor": scaling,
        "seconds_vae": round(t_vae, 1),
        "seconds_total": round(t_total, 1),
        "command": command or "python -m diffcls.train.demo --out diffcls/models/demo",
    }
    return write_training_record(out, info, t0)


def write_training_record(out: Path, info: dict, t0: float) -> Path:
    """`out/training.json` with `info` (the config, timings, torch version, threads, command) plus
    the versions and threads every trainer records; logs the saved model's size."""
    info = {**info, "torch": torch.__version__, "threads": torch.get_num_threads()}
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    _log(f"saved to {out} ({sum(p.stat().st_size for p in out.rglob('*') if p.is_file()) / 1e6:.2f} MB)", t0)
    return out


def classify_in_chunks(model, lat, cond, y, n_samples, to_keep, n_trials: int, seed: int, chunk: int,
                       t0: float | None = None, batch_size: int = 512, weighting: str = "none") -> tuple[list[int], int]:
    """Classify the latents `lat` with the library's scoring loop (`runtime.algorithm.scoring.Scorer`,
    what `diffcls classify` runs) on `model`'s denoiser in torch fp32, conditioned on `cond` (one row
    per prompt: text embeddings, or a DiT's class ids), the fixed schedule (`n_samples`, `to_keep`,
    `n_trials`) and the noise bank of `seed`. With `t0` (the start time) a line of running accuracy
    against the labels `y` every `chunk` images. Returns (predictions in `lat`'s order, UNet evaluations)."""
    from diffcls.engines.torch_backend import TorchEngine
    from diffcls.models.wrappers import wrap
    from diffcls.runtime.algorithm.schedule import Schedule
    from diffcls.runtime.algorithm.scoring import Scorer, make_noise_bank

    schedule = Schedule(tuple(n_samples), tuple(to_keep), n_trials, weighting=weighting)
    spec = model.component_specs(model.default_image_size)["unet"]
    unet = TorchEngine(wrap(model, "unet"), spec, torch.device("cpu"), torch.float32)
    bank = make_noise_bank(schedule, tuple(lat.shape[1:]), seed)
    scorer = Scorer(unet, cond, model.alphas_cumprod, schedule, bank, batch_size, prediction_type=model.prediction_type,
                    sigmas=getattr(model, "sigmas", None))
    preds: dict[int, int] = {}
    evals, truth = 0, y.tolist()
    for i, score in scorer.run((i, lat[i]) for i in range(len(lat))):
        preds[i], evals = score.prediction, evals + score.n_evals
        if t0 is not None and (len(preds) % chunk == 0 or len(preds) == len(lat)):
            acc = sum(int(p == truth[k]) for k, p in preds.items()) / len(preds)
            print(f"  {len(preds):4d}/{len(lat)} images  acc {acc:.4f}  {time.time() - t0:6.1f}s", flush=True)
    return [preds[i] for i in range(len(lat))], evals


def record_evaluation(out: Path, split: str, res: dict) -> None:
    """Keep a measurement beside the weights it measured: `res` as `eval_<split>` in training.json."""
    info_file = out / "training.json"
    info = json.loads(info_file.read_text())
    info[f"eval_{split}"] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()}
    info_file.write_text(json.dumps(info, indent=2) + "\n")


def trainer_arguments(
    prog: str, doc: str, out: str, *, model_help: str, splits=("heldout", "train"), threads: int = 2,
    threads_help: str = "torch CPU threads (results are exact per thread count)",
    limit_help: str = "evaluate only the first N images (class-balanced)",
) -> argparse.ArgumentParser:
    """The flags every demo trainer takes (where to save, `--eval`, the evaluation's schedule and
    seeds, threads); each trainer adds its own model's flags to the parser returned."""
    p = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(out), help="where to save the model")
    p.add_argument("--eval", action="store_true", help="only evaluate --model (no training)")
    p.add_argument("--no-eval", action="store_true", help="train and save without measuring held-out accuracy")
    p.add_argument("--model", type=Path, default=None, help=model_help)
    p.add_argument("--split", default="heldout", choices=list(splits))
    p.add_argument("--limit", type=int, default=None, help=limit_help)
    p.add_argument("--n-samples", type=int, nargs="+", default=None, help="schedule (default: the model's diffcls.json)")
    p.add_argument("--to-keep", type=int, nargs="+", default=None)
    p.add_argument("--n-trials", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="training seed")
    p.add_argument("--noise-seed", type=int, default=0, help="seed of the evaluation noise bank (diffcls' default: 0)")
    p.add_argument("--threads", type=int, default=threads, help=threads_help)
    return p


def start_trainer(threads: int) -> None:
    """Quiet diffusers (no "install accelerate" advice on every load), `threads` torch threads, and
    deterministic kernels: a trainer's results are exact for a given torch version and thread count."""
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


def main(argv: list[str] | None = None) -> None:
    p = trainer_arguments("python -m diffcls.train.demo", __doc__, "diffcls/models/demo",
                          model_help="model dir for --eval (default: the bundled demo)")
    p.add_argument("--unet-steps", type=int, default=None)
    p.add_argument("--vae-steps", type=int, default=None)
    args = p.parse_args(argv)

    import shlex
    import sys

    start_trainer(args.threads)

    if not args.eval:
        cfg = DemoConfig(seed=args.seed)
        if args.unet_steps is not None:
            cfg.unet_steps = args.unet_steps
        if args.vae_steps is not None:
            cfg.vae_steps = args.vae_steps
        train(args.out, cfg, "python -m diffcls.train.demo " + shlex.join(sys.argv[1:] if argv is None else argv))
        if args.no_eval:
            return
        args.model = args.out
    model_dir = args.model
    model = load_model(model_dir)
    defaults = json.loads((Path(model.source) / "diffcls.json").read_text())
    n_samples = args.n_samples or defaults["n_samples"]
    to_keep = args.to_keep or defaults["to_keep"]
    res = evaluate(model, args.split, args.limit, n_samples, to_keep, args.n_trials, seed=args.noise_seed)
    res.pop("predictions")
    print(json.dumps(res, indent=2))
    if not args.eval:  # keep the measurement beside the weights it measured
        record_evaluation(args.out, args.split, res)


if __name__ == "__main__":
    main()
