"""Train the bundled `demo-shapes` model: a small Stable Diffusion on the shapes world, from scratch.

    python -m diffcls.train.shapes --out diffcls/models/demo-shapes          # train + save + eval
    python -m diffcls.train.shapes --eval --model diffcls/models/demo-shapes # heldout accuracy

The same structure and recipe as the digits demo (`diffcls.train.demo`, whose pieces it
imports): a CLIP tokenizer whose vocabulary holds every caption word as one token, a
`CLIPTextModel` (causal attention and learned positional embeddings, so "a red circle left of a
blue square" and "a blue circle left of a red square" embed differently), an `AutoencoderKL`
(32x32 RGB -> 4x8x8) and a `UNet2DConditionModel` with cross-attention on the text at 8x8 and
4x4, under SD's DDPM schedule. The VAE is trained alone first, then the UNet and text encoder
together on its frozen, scaled latent means; the EMA weights are saved.

Data (`diffcls.models.shapes`, train split only; the images are exactly what `diffcls classify`
computes from the PNGs `diffcls shapes` writes): `single_per_class` single-object scenes of each
of the 24 seen colour-shape classes and `pairs` two-object scenes with every relation. Each
step a scene's caption is drawn from its true captions ("a small red circle" or "a red circle";
"a red circle left of a blue square" or its converse "a blue square right of a red circle"),
and with probability `uncond_prob` the empty caption (SD's caption dropout: the empty prompt
then means "any scene", which image-text matching uses to normalise an image's error).
Hard negatives (`hard_negatives`): up to `negative_rows` captioned two-object rows per batch
are also denoised under a swapped caption, and a two-way classification loss on the two
errors is added; without it this recipe learnt colours and shapes but not relations (text
score on relation swaps 19%, with it 100%: BENCHMARKS.md).

The prompts file lists all 30 colour-shape pairs ("a red circle"), the 6 novel ones included,
so a heldout image is classified among every pair and a novel one can be classified at all.
`--eval` measures single-object accuracy on a split and, with `--quads N`, the text score of
N Winoground-style items (each image's error under its two captions on one timestep grid with
shared noise). Seeded and deterministic for a given torch version and thread count.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from diffcls.models.loading import SDModel, alphas_cumprod_from_scheduler_config, load_model
from diffcls.models.shapes import (
    ALL_CLASSES, CAPTION_WORDS, IMAGE_SIZE, SEEN_CLASSES, TAGS, pair_scene, quadruple, render_scene, single_scene, swap,
    split_classes,
)
from diffcls.models.tiny import save_model
from diffcls.models.tokenizer import build_tokenizer_files
from diffcls.models.wrappers import VaeEncoderWrapper
from diffcls.runtime.data.preprocess import preprocess_image
from diffcls.train.demo import (
    DemoConfig, _log, build_components, scheduler_config, text_embeddings,
    classify_in_chunks, record_evaluation, start_trainer, timestep_grid, train_unet, train_vae_and_scale, trainer_arguments, write_training_record,
)


@dataclass
class ShapesConfig(DemoConfig):
    """The digits demo's fields (see `DemoConfig`), with the shapes world's sizes and steps."""
    text_layers: int = 3  # word order across up to 9 words ("a red circle left of a blue square")
    single_per_class: int = 200  # x 24 seen classes = 4,800 single-object scenes
    pairs: int = 7200  # two-object scenes (all four relations)
    vae_steps: int = 1000
    unet_steps: int = 3000
    uncond_prob: float = 0.05
    # hard negatives (see `hard_negatives`): weight of the two-way diffusion-classifier loss
    # between a two-object scene's caption and a swapped one; 0 trains on denoising alone
    negative_weight: float = 0.05
    negative_rows: int = 40  # at most this many rows of a batch get a hard negative (an extra UNet pass each)
    negative_mix: list[int] = field(default_factory=lambda: [1, 1, 2])  # relative odds of an attribute, object, relation swap
    text_lr: float = 3e-4  # the text encoder learns word order from scratch: faster than the digits' 1e-4
    # default classification schedule: 10 timesteps for all 30 classes, then 50 (40 new) for
    # the best 3 -> 420 UNet evaluations per image
    n_samples: list[int] = field(default_factory=lambda: [10, 50])
    to_keep: list[int] = field(default_factory=lambda: [3, 1])


def prompts() -> list[tuple[str, str, int]]:
    """(prompt, classname, classidx) for all 30 colour-shape pairs: ("a red circle", "red_circle", 0)."""
    return [("a " + name.replace("_", " "), name, i) for i, name in enumerate(ALL_CLASSES)]


# --- data ------------------------------------------------------------------------------------
def _tensor(scene) -> torch.Tensor:
    return preprocess_image(render_scene(scene), IMAGE_SIZE, "bicubic")  # (3, 32, 32) in [-1, 1]


def training_scenes(cfg: ShapesConfig) -> list:
    """Single-object scenes (class-interleaved), then two-object scenes, all from the train split."""
    singles = [single_scene("train", i, cfg.seed) for i in range(cfg.single_per_class * len(SEEN_CLASSES))]
    return singles + [pair_scene("train", i, cfg.seed) for i in range(cfg.pairs)]


def single_split(split: str, limit: int | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N, 3, 32, 32), class indices into `prompts()`) of a split's single-object scenes,
    the ones `diffcls shapes DIR --split S` writes (20 per class unless `limit`)."""
    n = limit if limit is not None else 20 * len(split_classes(split))
    scenes = [single_scene(split, i, seed) for i in range(n)]
    labels = torch.tensor([ALL_CLASSES.index(s.classname) for s in scenes])
    return torch.stack([_tensor(s) for s in scenes]), labels


def caption_condition(tokenizer, scenes: list, cfg: ShapesConfig):
    """`condition(text_encoder, idx)` for `train_unet`: a random true caption per row (or, with
    probability `uncond_prob`, the empty one), from its own seeded generator."""
    captions = sorted({c for s in scenes for c in s.captions()}) + [""]
    row = {c: i for i, c in enumerate(captions)}
    choices = torch.tensor([[row[c] for c in s.captions()] for s in scenes])  # (N, 2): every scene has two
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    empty = row[""]

    def condition(text_encoder, idx):
        pick = choices[idx, torch.randint(0, 2, (len(idx),), generator=gen)]
        pick = torch.where(torch.rand(len(idx), generator=gen) < cfg.uncond_prob, empty, pick)
        condition.captioned = pick != empty  # rows the hard-negative loss may contrast
        return text_encoder(input_ids=ids[pick], return_dict=False)[0]  # (B, 77, D)

    return condition


def hard_negatives(tokenizer, scenes: list, cfg: ShapesConfig, condition):
    """`extra_loss` for `train_unet`: for each captioned two-object row of the batch, the same
    noisy latent is also denoised under a caption of one of the scene's swaps (attribute, object
    or relation: "a blue circle left of a red square" for "a red circle left of a blue square"),
    and the loss adds `negative_weight` x softplus(S_true - S_swap), where S is the summed
    squared noise-prediction error: the two-way cross-entropy of the diffusion classifier's
    own decision at that timestep (the hard-negative training of DiffusionITM, Krojer et al.
    2023). Swaps that would be a novel scene are never used, so no novel colour-shape pair or
    arrangement is named in training. `negative_mix` weights the three kinds of swap."""
    table: list[list[str]] = []
    for s in scenes:
        own = set(s.captions())
        swaps = [(swap(s, tag), w) for tag, w in zip(TAGS, cfg.negative_mix)] if s.relation is not None else []
        table.append([c for s1, w in swaps if not s1.is_novel() for c in s1.captions() if c not in own for _ in range(w)])
    captions = sorted({c for cands in table for c in cands})
    row = {c: i for i, c in enumerate(captions)}
    rows = [[row[c] for c in cands] for cands in table]
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    gen = torch.Generator().manual_seed(cfg.seed + 2)

    def extra_loss(unet, text_encoder, idx, xt, t, eps, pred):
        live = [j for j, i in enumerate(idx.tolist()) if rows[i] and bool(condition.captioned[j])][: cfg.negative_rows]
        if not live:
            return pred.new_zeros(())
        draw = torch.randint(0, 1 << 30, (len(live),), generator=gen).tolist()
        pick = torch.tensor([rows[int(idx[j])][d % len(rows[int(idx[j])])] for j, d in zip(live, draw)])
        r = torch.tensor(live)
        neg = unet(xt[r], t[r], encoder_hidden_states=text_encoder(input_ids=ids[pick], return_dict=False)[0], return_dict=False)[0]
        s_true = ((pred[r] - eps[r]) ** 2).sum((1, 2, 3))
        s_swap = ((neg - eps[r]) ** 2).sum((1, 2, 3))
        return cfg.negative_weight * F.softplus(s_true - s_swap).mean()

    return extra_loss


# --- evaluation ------------------------------------------------------------------------------
def encode(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        enc = VaeEncoderWrapper(model.vae, model.scaling_factor)
        return torch.cat([enc(x[i : i + 256]) for i in range(0, len(x), 256)])


def evaluate(model, split: str = "heldout", limit: int | None = None, n_samples=(10, 50), to_keep=(3, 1),
             n_trials: int = 1, seed: int = 0, chunk: int = 32, verbose: bool = True) -> dict:
    """Top-1 accuracy over all 30 prompts on a split's single-object scenes."""
    x, y = single_split(split, limit)
    t0 = time.time()
    lat = encode(model, x)
    embeds = text_embeddings(model.tokenizer, model.text_encoder, [p for p, _, _ in prompts()])
    preds, evals = classify_in_chunks(model, lat, embeds, y, n_samples, to_keep, n_trials, seed, chunk, t0 if verbose else None)
    correct = sum(int(a == b) for a, b in zip(preds, y.tolist()))
    return {"split": split, "images": len(preds), "correct": correct, "accuracy": correct / len(preds),
            "n_samples": list(n_samples), "to_keep": list(to_keep), "n_trials": n_trials, "seed": seed,
            "unet_evals_per_image": evals / len(preds), "seconds": time.time() - t0}


@torch.no_grad()
def pair_errors(unet, lat: torch.Tensor, embeds: torch.Tensor, alphas: torch.Tensor, M: int = 50, seed: int = 0) -> torch.Tensor:
    """Mean noise-prediction error of each (latent i, embedding i) row over M grid timesteps,
    with the same noise for every row (paired comparisons)."""
    grid = torch.tensor(timestep_grid(alphas.shape[0], M))
    bank = torch.randn((M, *lat.shape[1:]), generator=torch.Generator().manual_seed(seed))
    a = alphas[grid].view(-1, 1, 1, 1)
    errs = []
    for i in range(lat.shape[0]):
        xt = a.sqrt() * lat[i] + (1 - a).sqrt() * bank  # (M, C, h, w)
        pred = unet(xt, grid, encoder_hidden_states=embeds[i].expand(M, -1, -1), return_dict=False)[0]
        errs.append(((bank - pred) ** 2).mean().double())
    return torch.stack(errs)


def text_score(model, split: str = "heldout", n: int = 60, M: int = 50, seed: int = 0) -> dict:
    """Per tag, the fraction of items whose every image prefers its own caption (Winoground's text score)."""
    items = [quadruple(split, i) for i in range(n)]
    x = torch.stack([_tensor(s) for s0, s1, _ in items for s in (s0, s1)])
    lat = encode(model, x)  # rows 2i, 2i+1: the item's images
    caps = [s.caption() for s0, s1, _ in items for s in (s0, s1)]
    emb = text_embeddings(model.tokenizer, model.text_encoder, caps)
    rows_lat = torch.cat([lat.repeat_interleave(2, 0)])  # (4n): img0 cap0, img0 cap1, img1 cap0, img1 cap1
    order = torch.tensor([2 * (k // 4) + (k % 2) for k in range(4 * n)])
    err = pair_errors(model.unet, rows_lat, emb[order], model.alphas_cumprod, M, seed).view(n, 2, 2)
    ok = (err[:, 0, 0] < err[:, 0, 1]) & (err[:, 1, 1] < err[:, 1, 0])
    by_tag = {t: round(float(ok[[i for i, it in enumerate(items) if it[2] == t]].float().mean()), 4) for t in TAGS}
    return {"split": split, "items": n, "timesteps": M, "text": round(float(ok.float().mean()), 4), "by_tag": by_tag}


# --- training entry point --------------------------------------------------------------------
def _write_defaults(out: Path, cfg: ShapesConfig) -> None:
    with open(out / "prompts.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["prompt", "classname", "classidx"])
        w.writerows(prompts())
    defaults = {"image_size": cfg.image_size, "prompts": "prompts.csv", "n_samples": cfg.n_samples, "to_keep": cfg.to_keep}
    (out / "diffcls.json").write_text(json.dumps(defaults, indent=2) + "\n")


def train(out: Path, cfg: ShapesConfig, command: str = "") -> Path:
    from transformers import CLIPTokenizer

    t0 = time.time()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = CLIPTokenizer.from_pretrained(str(build_tokenizer_files(out / "tokenizer", list(CAPTION_WORDS), cfg.max_length)))
    text_encoder, vae, unet = build_components(cfg, tokenizer)
    sched = scheduler_config()
    alphas = alphas_cumprod_from_scheduler_config(sched)

    scenes = training_scenes(cfg)
    x = torch.stack([_tensor(s) for s in scenes])
    _log(f"train split: {len(x)} scenes ({cfg.single_per_class * len(SEEN_CLASSES)} single, {cfg.pairs} pairs)", t0)
    lat, scaling = train_vae_and_scale(vae, x, cfg, gen, t0)
    t_vae = time.time() - t0

    condition = caption_condition(tokenizer, scenes, cfg)
    extra = hard_negatives(tokenizer, scenes, cfg, condition) if cfg.negative_weight > 0 else None
    labels = torch.zeros(len(scenes), dtype=torch.long)  # unused: `condition` conditions each row
    ema_unet, ema_text = train_unet(unet, text_encoder, tokenizer, lat, labels, alphas, cfg, gen, t0, condition, extra)
    t_total = time.time() - t0
    model = SDModel(tokenizer=tokenizer, text_encoder=ema_text, vae=vae, unet=ema_unet, alphas_cumprod=alphas)
    save_model(model, out, sched)
    _write_defaults(out, cfg)
    info = {"config": asdict(cfg), "train_scenes": len(scenes), "scaling_factor": scaling,
            "seconds_vae": round(t_vae, 1), "seconds_total": round(t_total, 1),
            "command": command or "python -m diffcls.train.shapes --out diffcls/models/demo-shapes"}
    return write_training_record(out, info, t0)


def main(argv: list[str] | None = None) -> None:
    import shlex
    import sys

    p = trainer_arguments("python -m diffcls.train.shapes", __doc__, "diffcls/models/demo-shapes",
                          model_help="model dir for --eval (default: --out)", splits=("heldout", "novel", "train"), threads=1,
                          threads_help="torch CPU threads (results are exact per thread count; 1: on a busy 2-core machine two threads wait on each other)",
                          limit_help="evaluate only the first N single-object images (class-balanced)")
    p.add_argument("--quads", type=int, default=0, help="also measure the text score on the first N items of the split")
    p.add_argument("--unet-steps", type=int, default=None)
    p.add_argument("--vae-steps", type=int, default=None)
    p.add_argument("--pairs", type=int, default=None, help="two-object training scenes")
    p.add_argument("--single-per-class", type=int, default=None)
    p.add_argument("--negative-weight", type=float, default=None, help="hard-negative loss weight (0: denoising only)")
    p.add_argument("--negative-rows", type=int, default=None, help="at most this many hard negatives per batch")
    p.add_argument("--negative-mix", type=int, nargs=3, default=None, metavar=("ATTR", "OBJ", "REL"),
                   help="relative odds of attribute, object and relation swaps as hard negatives")
    args = p.parse_args(argv)

    start_trainer(args.threads)
    if not args.eval:
        cfg = ShapesConfig(seed=args.seed)
        for name in ("unet_steps", "vae_steps", "pairs", "single_per_class", "negative_weight", "negative_rows", "negative_mix"):
            if getattr(args, name) is not None:
                setattr(cfg, name, getattr(args, name))
        train(args.out, cfg, "python -m diffcls.train.shapes " + shlex.join(sys.argv[1:] if argv is None else argv))
        if args.no_eval:
            return
    model = load_model(args.model or args.out)
    defaults = json.loads((Path(model.source) / "diffcls.json").read_text())
    res = evaluate(model, args.split, args.limit, args.n_samples or defaults["n_samples"],
                   args.to_keep or defaults["to_keep"], args.n_trials, seed=args.noise_seed)
    if args.quads:
        res["text_score"] = text_score(model, args.split, args.quads, seed=args.noise_seed)
    print(json.dumps(res, indent=2))
    if not args.eval:  # keep the measurement beside the weights it measured
        record_evaluation(args.out, args.split, res)


if __name__ == "__main__":
    main()
