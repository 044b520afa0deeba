"""The options classify, evaluate and profile share: declared once, validated once, refused with
one line (exit 2) when a backend cannot honour them."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from diffcls.cli.app import app
from diffcls.cli.classify import join_list_flags
from diffcls.cli.settings import OPTIONS, RunSettings
from diffcls.config import Backend, Precision, parse_device
from diffcls.errors import DiffclsError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "digits"
runner = CliRunner()


def _params(name: str) -> set[str]:
    command = typer.main.get_command(app)
    return {p.name for p in command.commands[name].params}


def test_shared_options_are_the_same_on_every_run_command():
    for name in ("classify", "evaluate", "profile"):
        assert set(OPTIONS) <= _params(name), name
    assert {"out_csv", "save_errors"} <= _params("classify")
    assert {"limit", "warmup", "json_out", "plot"} <= _params("profile")


def _run(*args: str):
    result = runner.invoke(app, join_list_flags(list(args)))
    return result.exit_code, result.output


@pytest.mark.parametrize(
    "args, expect",
    [
        (["--engines", "eng", "--compile"], "--compile applies to the torch backend only"),
        (["--engines", "eng", "--backend", "torch"], "--backend torch runs a model"),
        (["--backend", "onnxruntime"], "pass --engines DIR"),
        (["--engines", "eng", "--precision", "bf16"], "bf16 runs only on the torch backend"),
        (["--device", "tpu"], "--device 'tpu' is not a device"),
        (["--device", "gpu"], "GPUs are named cuda or cuda:N"),
        (["--device", "0"], "GPUs are named cuda or cuda:N"),
        (["--n-samples", "-1", "2", "--to-keep", "1", "1"], "must be >= 1"),
        (["--n-samples", "10", "50"], "give both --n-samples and --to-keep"),
        (["--classes", "a,b", "--template", "{} {x}"], "has a field other than {}"),
        (["--classes", "a,b", "--prompts", "p.csv"], "either --prompts or --classes"),
    ],
)
@pytest.mark.parametrize("command", ["classify", "profile"])
def test_bad_combinations_are_one_line_errors(command, args, expect, tmp_path):
    code, output = _run(command, str(EXAMPLES), *args)
    assert code == 2, output
    assert expect in output
    assert "Traceback" not in output
    assert len([line for line in output.splitlines() if line.startswith("error:")]) == 1


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_without_a_gpu_is_one_line():
    code, output = _run("classify", str(EXAMPLES), "--device", "cuda", "--no-cache")
    assert code == 2 and "sees no CUDA GPU" in output and "Traceback" not in output


def test_parse_device():
    assert parse_device("auto") is None and parse_device(None) is None
    assert parse_device("CPU") == "cpu" and parse_device("cuda:1") == "cuda:1"
    for bad in ("tpu", "gpu", "0", "cuda:x", "cuda:"):
        with pytest.raises(DiffclsError):
            parse_device(bad)


def test_settings_are_frozen_and_parsed():
    s = RunSettings.from_options(n_samples="10 50", to_keep="3,1", device="auto", backend=Backend.auto, precision=Precision.auto)
    assert s.n_samples == (10, 50) and s.to_keep == (3, 1) and s.device is None
    with pytest.raises(Exception):
        s.seed = 1  # frozen


def test_noise_help_shows_its_shape():
    result = runner.invoke(app, ["classify", "--help"], env={"COLUMNS": "200"})
    assert "[max(n_samples)*n_trials, C, h, w]" in result.output
