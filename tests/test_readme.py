"""Every command in README.md runs (issue 9 item 11): a README edit that breaks one fails here.

The test reads the README's ```bash blocks in order, splits each line at `&&`, and runs every
`diffcls ...` command through Typer's CliRunner (as the console script would: same argument
joining) in one scratch folder, so later commands see what earlier ones wrote. The Python API
block runs too. What a CPU test cannot afford is replaced in the open, each rule with its
reason (SUBSTITUTIONS, SCHEDULE); what it cannot run at all is listed with its reason (SKIPS).
Every rule must still match something, so a stale rule fails too. The inputs the README assumes
a user has (photos/, prompts.csv, a labels CSV, a folder by class index) are made by `_inputs`.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from diffcls.cli.app import app
from diffcls.cli.classify import join_list_flags

from conftest import random_image

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# (pattern in a README command, replacement, why); {model}, {tmp} are filled in
SUBSTITUTIONS = [
    (r"\./stable-diffusion-2-1-base|\./sd21", "{model}", "no real Stable Diffusion weights offline: the tiny SD-shaped test model stands in"),
    (r"\./DiT-XL-2-256", "{dit}", "no real DiT weights offline: a tiny random DiTTransformer2DModel directory stands in"),
    (r"\./stable-diffusion-3\.5-medium", "{tmp}/sd3", "no real SD3 weights offline: a tiny random SD3 directory (models.tiny.tiny_sd3) stands in"),
    (r"\./sdxl-base", "{tmp}/sdxl", "no real SDXL weights offline: a tiny random SDXL directory (models.tiny.tiny_sdxl) stands in"),
    (r"--image-size 1024", "--image-size 16", "the tiny SDXL stand-in takes 16 px images"),
    (r"(--model (?:\S*/sd3|stabilityai/stable-diffusion-xl-base-1\.0) --classes \S+)", r"\1 --n-samples 2 4 --to-keep 2 1",
     "the default 550 timesteps per image on two more families; 6 run the same code"),
    (r"(diffcls evaluate examples/digits --model demo-flow)", r"\1 --n-samples 2 4 --to-keep 2 1",
     "the flow demo's default is 220 UNet calls per image; 6 timesteps run the same code"),
    (r"--n-samples 50 500", "--n-samples 4 8", "the paper's 550 timesteps per image take minutes on a CPU; 12 run the same code"),
    (r"(diffcls digits --out digits/ --split heldout)", r"\1 --limit 20", "20 of the 359 held-out digits (2 per class) keep the later commands short"),
    (r"(diffcls profile .*)--limit 20", r"\1--limit 2", "2 images profile every stage"),
    (r"(diffcls shapes shapes/ --split heldout)", r"\1 --limit 30", "30 single-object scenes and 30 items show the layout; the default 1,680 images take seconds more"),
    (r"--out diffcls/models/demo-shapes", "--out {tmp}/demo-shapes --unet-steps 2 --vae-steps 2 --pairs 8 --single-per-class 1 --no-eval",
     "the full shapes recipe takes about 50 minutes and draws 12,000 scenes; 2 steps on 32 scenes run the same code"),
    (r"(diffcls evaluate shapes/classes --model demo-shapes)", r"\1 --n-samples 2 4 --to-keep 2 1",
     "the model's default is 420 UNet calls per image (30 prompts); 6 timesteps run the same code"),
    (r"(diffcls match shapes/quadruples.csv --model demo-shapes)", r"\1 --limit 3 --t-interval 250",
     "the reference's grid is 1,200 UNet calls per item; 3 items on 4 timesteps run the same code"),
    (r"--out diffcls/models/demo", "--out {tmp}/demo --unet-steps 2 --vae-steps 2 --no-eval",
     "the full training recipe takes 13 minutes; 2 steps of each model run the same code and leave the bundled model alone"),
]
# demo-model runs without a schedule get this one (the demo's default is 220 UNet calls per image)
SCHEDULE = ["--n-samples", "2", "4", "--to-keep", "2", "1"]
SKIPS = [
    (r"^python3 -m venv ", "creates the environment; .ci/run does this on a fresh clone"),
    (r"^\. \.venv/bin/activate$", "activates the environment; .ci/run does this"),
    (r"^pip install ", "installs packages; .ci/run installs the dev extra (a superset) on a fresh clone"),
    (r"^python -m pytest", "the test suite itself, which .ci/run runs"),
    (r" --ray\b", "ImageNet on GPUs or a Ray cluster; tests/test_distributed.py runs --ray on a local 2-CPU cluster"),
    (r"^ray start ", "starts a node of a Ray cluster; tests/test_distributed.py starts a local cluster"),
    (r"^CUDA_VISIBLE_DEVICES=\d diffcls classify val/ --shard", "one shard per GPU of an unnamed folder; tests/test_distributed.py runs shards + merge on the demo model"),
    (r"^diffcls merge --out val\.csv part0\.csv", "merges the GPU shards above; tests/test_distributed.py checks merge against one process"),
]
SKIPS.append((r"^diffcls classify photos/ .*--device cuda", "an SD model on a CUDA GPU (no weights or GPU here); tests/test_gpu.py runs the CUDA paths, BENCHMARKS.md has the run"))
if importlib.util.find_spec("tensorrt") is None:
    SKIPS.append((r"--backend tensorrt", "needs a GPU with TensorRT; tests/test_trt.py covers it where TensorRT is installed"))


def bash_commands(text: str) -> list[str]:
    """Each simple command of the README's bash blocks, in order (continuations joined, comments cut)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            parts, cur = [], []
            for t in tokens + ["&&"]:
                if t == "&&":
                    if cur:
                        parts.append(shlex.join(cur))
                    cur = []
                else:
                    cur.append(t)
            commands += parts
    return commands


def _inputs(tmp: Path) -> None:
    """What the README's own-model examples assume the user has."""
    (tmp / "examples").symlink_to(ROOT / "examples", target_is_directory=True)
    photos = tmp / "photos"
    (photos / "more").mkdir(parents=True)
    for i, name in enumerate(["cat.png", "a.jpg", "b.jpg", "more/c.png"]):
        random_image(i).save(photos / name)
    (tmp / "prompts.csv").write_text("prompt,classname,classidx\na photo of a cat.,cat,0\na cat.,cat,0\na dog.,dog,1\n")
    (tmp / "labels.csv").write_text("path,label\nphotos/cat.png,cat\nphotos/a.jpg,dog\nphotos/more/c.png,bird\n")
    for idx in range(3):
        (tmp / "by-index" / str(idx)).mkdir(parents=True)
        random_image(10 + idx).save(tmp / "by-index" / str(idx) / "x.png")
    random_image(20).save(tmp / "a.png")
    random_image(21).save(tmp / "b.jpg")


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DIFFCLS_CACHE", str(tmp_path / "cache"))
    _inputs(tmp_path)
    threads = torch.get_num_threads()
    yield tmp_path
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(False)  # the demo trainer turns it on


def _models_users_have(tmp: Path, tiny, tiny_dir, monkeypatch) -> None:
    """The README's model-id and checkpoint examples: the tiny model stands in, laid out as
    `hf download` leaves a model in the (scratch) Hugging Face cache and as original-format
    single-file checkpoints under the README's file names."""
    from huggingface_hub import constants

    from test_hub import cache_model, write_ldm_checkpoint

    hub = tmp / "hf-hub"
    hub.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    for repo in ("stabilityai/stable-diffusion-2-1-base", "stable-diffusion-v1-5/stable-diffusion-v1-5"):
        cache_model(hub, repo, tiny_dir)
    from diffcls.models.sd3 import save_sd3_directory
    from diffcls.models.sdxl import save_sdxl_directory
    from diffcls.models.tiny import TinyConfig, flow_scheduler_config, scheduler_config, tiny_sd3, tiny_sdxl

    save_sd3_directory(tiny_sd3(seed=0), tmp / "sd3", flow_scheduler_config(1000, 3.0))
    save_sdxl_directory(tiny_sdxl(seed=0), tmp / "sdxl", {**scheduler_config(TinyConfig()), "_class_name": "EulerDiscreteScheduler"})
    cache_model(hub, "stabilityai/stable-diffusion-xl-base-1.0", tmp / "sdxl")
    for name in ("v1-5-pruned-emaonly.safetensors", "v2-1_512-ema-pruned.safetensors"):
        write_ldm_checkpoint(tiny, tmp / name)


def test_readme_commands_run(scratch, tiny, tiny_dir, tiny_dit_dir, monkeypatch):
    pytest.importorskip("sklearn", reason="the README's digits commands need scikit-learn (pip install 'diffcls[train]')")
    _models_users_have(scratch, tiny, tiny_dir, monkeypatch)
    used = set()
    ran, skipped = [], []
    for command in bash_commands(README.read_text()):
        original = command
        for pattern, replacement, _why in SUBSTITUTIONS:
            new = re.sub(pattern, replacement.format(model=tiny_dir, dit=tiny_dit_dir, tmp=scratch), command)
            if new != command:
                used.add(pattern)
            command = new
        skip = [why for pattern, why in SKIPS if re.search(pattern, command)]
        if skip:
            used.update(p for p, _ in SKIPS if re.search(p, command))
            skipped.append(original)
            continue
        tokens = shlex.split(command)
        if tokens[0] == "diffcls":
            if tokens[1] in ("classify", "evaluate", "profile", "calibrate") and "--model" not in tokens and "--n-samples" not in tokens:
                tokens += SCHEDULE  # the bundled demo model: its default schedule is 220 UNet calls per image
            r = CliRunner().invoke(app, join_list_flags(tokens[1:]))
            assert r.exit_code == 0, f"README command failed: {original}\nran: {shlex.join(tokens)}\n{r.output}"
        elif tokens[:3] == ["python", "-m", "diffcls.train.demo"]:
            from diffcls.train.demo import main

            main(tokens[3:])
        elif tokens[:3] == ["python", "-m", "diffcls.train.shapes"]:
            from diffcls.train.shapes import main as train_shapes

            train_shapes(tokens[3:])
        else:
            pytest.fail(f"README command {original!r} is neither run nor skipped here: add it to SKIPS with a reason, or run it")
        ran.append(original)
    stale = [p for p, *_ in SUBSTITUTIONS + [(p, w) for p, w in SKIPS] if p not in used]
    assert not stale, f"rules that match no README command any more: {stale}"
    assert sum(c.startswith("diffcls ") for c in ran) >= 13, ran
    # what the commands wrote is what the README says they write
    assert (scratch / "results.csv").exists() and (scratch / "confusion.png").exists()
    assert (scratch / "engines" / "manifest.json").exists() and (scratch / "profile.json").exists()
    assert (scratch / "eval.csv").read_text().splitlines()[0].endswith(",label,correct")
    assert (scratch / "demo" / "unet").is_dir()


def test_readme_python_example_runs(scratch):
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    env: dict = {}
    exec(compile(code, "README.md", "exec"), env)
    # the answers the comments promise: the demo model reads both digits right
    assert [r.classname for r in env["results"]] == ["three", "seven"]
    probs = env["r"].probabilities(k=3)
    assert env["r"].ranked(3)[0].classname == "three" and probs[0][2] == max(p for *_, p in probs)
    assert len(env["outcomes"]) == 10 and env["outcomes"]["three/heldout_0003.png"].prediction == "three"
    assert (scratch / "api-results.csv").exists()


def test_default_keep_is_capped_only_when_not_given():
    """The README's own-model example once failed: --to-keep 5 1 with 3 classes. Only the default
    schedule is capped at the prompt count; a --to-keep the user gives is checked, not changed."""
    from diffcls.runtime.execution.resolve import build_schedule
    from diffcls.runtime.execution.spec import JobSpec as RunSettings
    from diffcls.errors import DiffclsError

    s = build_schedule(RunSettings(), 3, {})
    assert s.n_samples == (50, 500) and s.to_keep == (3, 1)
    s.validate(3, 1000)
    given = build_schedule(RunSettings(n_samples=(50, 500), to_keep=(5, 1)), 3, {})
    assert given.to_keep == (5, 1)
    with pytest.raises(DiffclsError, match="--to-keep 5 is more than the 3 prompts"):
        given.validate(3, 1000)
