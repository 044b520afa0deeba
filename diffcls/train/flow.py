"""Train the bundled flow-matching demo (`demo-flow`): the digits demo, trained as a rectified flow.

    python -m diffcls.train.flow --out diffcls/models/demo-flow          # train + save + eval
    python -m diffcls.train.flow --eval --model diffcls/models/demo-flow # held-out accuracy

The same model and recipe as `diffcls.train.demo` (VAE, CLIP text encoder and SD-layout UNet on
scikit-learn's digits, from scratch), with Stable Diffusion 3's training objective instead of
DDPM's: the scheduler is SD3's `FlowMatchEulerDiscreteScheduler` config (1000 steps, shift 3.0),
timesteps are drawn as SD3 draws them (u ~ logit-normal(0, 1) over the scheduler's index),
x_t = (1 - σ_t) x0 + σ_t eps and the UNet learns the velocity eps - x0 (`FlowObjective`).
A UNet rather than an SD3 transformer keeps it trainable in minutes on two cores; what it shows
is the flow-matching path of diffcls (noising, target, the sigma grid, the timestep weighting),
which is the same for `SD3Transformer2DModel`.

Its `diffcls.json` scores with the logit-normal timestep weighting (its training density);
`--weighting none` measures the unweighted mean for comparison.
"""

from __future__ import annotations

import json
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from diffcls.models.loading import load_model
from diffcls.models.noising import WEIGHTINGS
from diffcls.models.tiny import flow_scheduler_config
from diffcls.train.demo import DemoConfig, evaluate, record_evaluation, start_trainer, train, trainer_arguments

SHIFT = 3.0  # SD3's
WEIGHTING = "logit-normal"  # the default written to diffcls.json


@dataclass
class FlowDemoConfig(DemoConfig):
    shift: float = SHIFT


def main(argv: list[str] | None = None) -> None:
    p = trainer_arguments("python -m diffcls.train.flow", __doc__, "diffcls/models/demo-flow",
                          model_help="model dir for --eval (default: the bundled demo-flow)", threads=1)
    p.add_argument("--unet-steps", type=int, default=None)
    p.add_argument("--vae-steps", type=int, default=None)
    p.add_argument("--weighting", choices=WEIGHTINGS, default=None, help="timestep weighting (default: the model's diffcls.json)")
    p.add_argument("--record", action="store_true", help="with --eval: keep the result in the model's training.json")
    args = p.parse_args(argv)
    start_trainer(args.threads)
    if not args.eval:
        cfg = FlowDemoConfig(seed=args.seed)
        if args.unet_steps is not None:
            cfg.unet_steps = args.unet_steps
        if args.vae_steps is not None:
            cfg.vae_steps = args.vae_steps
        command = "python -m diffcls.train.flow " + shlex.join(sys.argv[1:] if argv is None else argv)
        train(args.out, cfg, command, sched=flow_scheduler_config(1000, cfg.shift), defaults={"weighting": WEIGHTING})
        if args.no_eval:
            return
        args.model = args.out
    model = load_model(args.model or "demo-flow")
    defaults = json.loads((Path(model.source) / "diffcls.json").read_text())
    default = defaults.get("weighting", "none")
    # after training: the default weighting and, side by side, the other (eval_<split>_<weighting>)
    weightings = [args.weighting or default] if args.eval else [default, *(w for w in WEIGHTINGS if w != default)]
    for weighting in weightings:
        res = evaluate(model, args.split, args.limit, args.n_samples or defaults["n_samples"], args.to_keep or defaults["to_keep"],
                       args.n_trials, seed=args.noise_seed, weighting=weighting)
        res.pop("predictions")
        res["weighting"] = weighting
        print(json.dumps(res, indent=2))
        if not args.eval or args.record:
            where = Path(model.source)
            record_evaluation(where, args.split if weighting == default else f"{args.split}_{weighting}", res)


if __name__ == "__main__":
    main()
