"""The CPU fast path (issue 23 item 4): with no flags, a CPU run of a bundled model exports it once
into the cache directory and runs ONNX Runtime engines; the thread count follows the free cores;
explicit flags win; without onnxruntime torch runs with a one-line note."""

from __future__ import annotations

import json
import re
import shutil
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from diffcls.cli.app import app
from diffcls.engines import fastpath
from diffcls.engines.fastpath import choose_threads, plan_engines

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "digits"
SCHEDULE = ["--n-samples", "2,4", "--to-keep", "2,1"]


# --- the plan: what runs, decided from the flags alone ---------------------------------------
def test_plan_default_on_cpu_is_the_bundled_models_cached_engines(tmp_path):
    pytest.importorskip("onnxruntime")
    for model, name in ((None, "demo"), ("demo", "demo"), ("demo-dit", "demo-dit")):
        plan = plan_engines(model=model, device="cpu", cache_dir=tmp_path)
        assert (plan.backend, plan.bundled, plan.engine_dir, plan.note) == ("onnxruntime", name, tmp_path / "engines", None)


def test_plan_explicit_flags_win(tmp_path, tiny_dir):
    assert plan_engines(backend="torch", device="cpu").backend == "torch"
    eng = tmp_path / "eng"
    eng.mkdir()
    (eng / "manifest.json").write_text(json.dumps({"format": 1, "backend": "tensorrt", "components": {}}))
    plan = plan_engines(engines=eng, device="cpu")
    assert (plan.backend, plan.engine_dir, plan.bundled) == ("tensorrt", eng, None)
    assert plan_engines(device="cpu", compile=True).backend == "torch"
    assert plan_engines(device="cuda").backend == "torch"  # on a GPU torch fp16 is the measured fast path
    own = plan_engines(model=tiny_dir, device="cpu")  # a user's model: exporting it is `diffcls export`'s job
    assert own.backend == "torch" and own.bundled is None and "diffcls export --model" in own.note


def test_plan_without_onnxruntime_runs_torch_with_a_note(monkeypatch):
    monkeypatch.setattr(fastpath, "onnx_available", lambda: False)
    plan = plan_engines(device="cpu")
    assert plan.backend == "torch" and plan.bundled is None
    assert "onnxruntime is not installed" in plan.note and '".[onnx]"' in plan.note


# --- threads -----------------------------------------------------------------------------------
@pytest.mark.parametrize("cores, load, want", [(2, 0.2, 2), (2, 0.7, 1), (2, 1.3, 1), (2, 9.0, 1), (8, 2.4, 6), (1, 0.0, 1)])
def test_threads_follow_the_free_cores(monkeypatch, cores, load, want):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(fastpath, "free_cores", lambda: (cores, load))
    choice = choose_threads(None)
    assert choice.n == want and f"load {load:.1f}" in choice.why


def test_threads_explicit_then_environment(monkeypatch):
    monkeypatch.setattr(fastpath, "free_cores", lambda: (2, 0.0))
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert choose_threads(None).n == 3 and choose_threads(5).n == 5
    monkeypatch.setenv("OMP_NUM_THREADS", "")
    assert choose_threads(None).n == 2


# --- the cached export ---------------------------------------------------------------------------
def test_cached_engines_export_once_verify_and_rebuild(tmp_path, tiny_dir):
    pytest.importorskip("onnxruntime")
    from diffcls.engines.manifest import read_manifest, verify_engine_dir
    from diffcls.export.cached import ensure_cached_engines

    root = tmp_path / "engines"
    said: list[str] = []
    got: list[Path] = []

    def ensure():
        # the tiny model stands in for a bundled one, cached under the demo's name
        got.append(ensure_cached_engines("demo", root, source=tiny_dir, image_size=16, on_export=said.append))

    workers = [threading.Thread(target=ensure) for _ in range(2)]  # two runs at once: one export
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(said) == 1 and said[0].startswith("exporting the demo model to ONNX Runtime engines in ") and "(once, ~" in said[0]
    assert got[0] == got[1] and got[0].parent == root and re.fullmatch(r"demo-[0-9a-f]{16}-16px", got[0].name)
    m = verify_engine_dir(got[0], backend="onnxruntime", image_size=16)
    assert all(c["batch_sizes"] == [] for c in m["components"].values())  # any --batch-size runs
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]  # nothing half-built left
    ensure()  # fresh: no second export
    assert len(said) == 1 and got[-1] == got[0]
    unet = got[0] / read_manifest(got[0])["components"]["unet"]["file"]
    unet.write_bytes(unet.read_bytes()[:-10] + b"0" * 10)  # corrupted: rebuilt, atomically
    ensure()
    assert len(said) == 2 and got[-1] == got[0]
    verify_engine_dir(got[0], backend="onnxruntime", image_size=16)
    # `diffcls cache` counts them; --clear removes them and nothing else under the directory
    (root / "mine").mkdir()
    (root / "demo-notes.txt").write_text("a user's file")
    r = CliRunner().invoke(app, ["cache", "--cache-dir", str(tmp_path)])
    assert r.exit_code == 0 and "1 engine directories" in r.output, r.output
    r = CliRunner().invoke(app, ["cache", "--cache-dir", str(tmp_path), "--clear"])
    assert r.exit_code == 0 and "and 1 engine directories" in r.output, r.output
    assert sorted(p.name for p in root.iterdir()) == ["demo-notes.txt", "mine"]


def test_cached_engines_follow_the_models_defaults(tmp_path, tiny_dir):
    """The fingerprint covers the weights only: when a bundled model's diffcls.json or prompts
    file changes (a package upgrade with new timestep weights), its cached engines carry the new
    copy, not the one from the day they were exported."""
    pytest.importorskip("onnxruntime")
    from diffcls.export.cached import ensure_cached_engines

    source = tmp_path / "model"
    shutil.copytree(tiny_dir, source)
    (source / "prompts.csv").write_text("class,prompt\n0,a zero\n1,a one\n")
    defaults = {"image_size": 16, "prompts": "prompts.csv", "timestep_weights": [0.0, 1.0]}
    (source / "diffcls.json").write_text(json.dumps(defaults))
    said: list[str] = []

    def ensure() -> Path:
        return ensure_cached_engines("demo", tmp_path / "engines", source=source, image_size=16, on_export=said.append)

    d = ensure()
    assert len(said) == 1 and json.loads((d / "diffcls.json").read_text()) == defaults
    assert ensure() == d and len(said) == 1  # unchanged: no second export
    defaults["timestep_weights"] = [0.5, 1.5]
    (source / "diffcls.json").write_text(json.dumps(defaults))
    assert ensure() == d and len(said) == 2
    assert json.loads((d / "diffcls.json").read_text())["timestep_weights"] == [0.5, 1.5]
    (source / "prompts.csv").write_text("class,prompt\n0,a photo of a zero\n1,a photo of a one\n")
    assert ensure() == d and len(said) == 3
    assert "a photo of a zero" in (d / "prompts.csv").read_text()
    assert ensure() == d and len(said) == 3


# --- the CLI: what the user sees ----------------------------------------------------------------
def _classify(tmp_path, *extra):
    folder = tmp_path / "digits"
    if not folder.exists():
        for name in ("three", "seven"):
            (folder / name).mkdir(parents=True)
            shutil.copy(next((EXAMPLES / name).glob("*.png")), folder / name)
    out = tmp_path / f"r{len(list(tmp_path.glob('r*.csv')))}.csv"
    r = CliRunner().invoke(app, ["classify", str(folder), *SCHEDULE, "--out", str(out), *extra])
    assert r.exit_code == 0, r.output
    preds = [row.split(",")[1] for row in out.read_text().splitlines()[1:]]
    return r.output, preds


def test_cli_default_runs_cached_onnx_engines_and_says_so(tmp_path):
    pytest.importorskip("onnxruntime")
    from diffcls.config import default_cache_dir

    output, preds = _classify(tmp_path)
    ran = [line for line in output.splitlines() if line.startswith("running ")]
    assert len(ran) == 1 and ran[0].startswith("running onnxruntime engines in "), output
    assert str(default_cache_dir() / "engines" / "demo-") in ran[0] and re.search(r"\d+ threads? \(", ran[0])
    assert "exporting the demo model" not in _classify(tmp_path)[0]  # exported at most once
    torch_output, torch_preds = _classify(tmp_path, "--backend", "torch")  # the opt-out
    assert "running torch, 1 thread" in torch_output and torch_preds == preds == ["seven", "three"]
    assert "1 thread ($OMP_NUM_THREADS)" in torch_output  # the test session's OMP_NUM_THREADS=1
    assert "running torch, 2 threads (--threads)" in _classify(tmp_path, "--backend", "torch", "--threads", "2")[0]


def test_cli_without_onnxruntime_falls_back_to_torch(tmp_path, monkeypatch):
    monkeypatch.setattr(fastpath, "onnx_available", lambda: False)
    output, preds = _classify(tmp_path)
    notes = [line for line in output.splitlines() if line.startswith("note: onnxruntime is not installed")]
    assert len(notes) == 1 and "running torch, 1 thread" in output and preds == ["seven", "three"]


def test_python_api_runs_the_engines_the_cli_runs(tmp_path):
    """`diffcls.Classifier.from_pretrained()` and `diffcls.ClassifyJob` take the CLI's fast path
    (diffcls.api): the demo's cached ONNX Runtime engines on a CPU, the same directory and the same
    predictions as `diffcls classify` with no flags; the runtime's own classes run what they are given."""
    pytest.importorskip("onnxruntime")
    import diffcls
    from diffcls.runtime.execution.classifier import Classifier as RuntimeClassifier

    output, preds = _classify(tmp_path)
    engine_dir = next(line for line in output.splitlines() if line.startswith("running ")).split(" engines in ")[1].split(",")[0]
    clf = diffcls.Classifier.from_pretrained(use_cache=False)
    assert clf.engines.backend == "onnxruntime" and clf.engine_info()["engines_digest"] is not None
    assert RuntimeClassifier.from_pretrained(use_cache=False).engines.backend == "torch"
    said: list[str] = []
    job = diffcls.ClassifyJob(diffcls.JobSpec(n_samples=(2, 4), to_keep=(2, 1)), [tmp_path / "digits"], out=tmp_path / "api.csv", say=said.append)
    assert job.spec.engines == Path(engine_dir) and job.spec.backend.value == "onnxruntime"
    assert [line for line in said if line.startswith("running onnxruntime engines in ")], said
    outcomes = job.run()
    assert [outcomes[k].prediction for k in sorted(outcomes)] == preds == ["seven", "three"]
    cli_csv = sorted(tmp_path.glob("r*.csv"))[0]
    assert (tmp_path / "api.csv").read_text() == cli_csv.read_text()
