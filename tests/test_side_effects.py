"""No process-wide side effects from the library (issue 9 item 10): loading, opening engines and
exporting leave the environment, the root logger and sys.stdout/stderr as they were."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = r"""
import json, logging, os, sys
import torch, diffusers, transformers, onnx, onnxruntime  # third-party imports may set what they like
env0 = dict(os.environ)
root = logging.getLogger()
root0 = (root.level, list(root.handlers))
streams0 = (sys.stdout, sys.stderr)
diffusers0 = diffusers.utils.logging.get_verbosity()

from diffcls.engines import open_engines
from diffcls.export import ExportConfig, export_model
from diffcls.models import load_model

model_dir, out = sys.argv[1], sys.argv[2]
model = load_model(model_dir)
open_engines("torch", model=model, device="cpu")
export_model(ExportConfig(out=out, model=model_dir, batch_sizes=(2,), image_size=16, device="cpu"))
open_engines("onnxruntime", engine_dir=out, model=model_dir, device="cpu")
changed = sorted(k for k in set(env0) | set(os.environ) if env0.get(k) != os.environ.get(k))
print("RESULT " + json.dumps({
    "env": changed,
    "root_level": root.level == root0[0],
    "root_handlers": list(root.handlers) == root0[1],
    "streams": (sys.stdout, sys.stderr) == streams0,
    "diffusers_verbosity": diffusers.utils.logging.get_verbosity() == diffusers0,
}))
"""


def test_library_leaves_the_process_as_it_found_it(tiny_dir, tmp_path):
    pytest.importorskip("onnxruntime")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    env["DIFFCLS_CACHE"] = str(tmp_path / "cache")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tiny_dir), str(tmp_path / "engines")],
        capture_output=True, text=True, env=env, timeout=600,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-2000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result == {"env": [], "root_level": True, "root_handlers": True, "streams": True, "diffusers_verbosity": True}
