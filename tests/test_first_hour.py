"""What a new user meets in the first hour (issue 23 items 6-13): a summary on every run, one
image's top classes and --json, --limit/--sample, info on a model, the inputs users have
(imagefolder metadata.csv, URLs), digits into a used folder, help text, the quiet Python API."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from typer.testing import CliRunner

from conftest import EXAMPLES, FAST_DIGITS, assert_one_line_error, csv_rows, invoke_cli
from diffcls.cli.app import app

FAST = FAST_DIGITS
runner = CliRunner()
invoke, rows = invoke_cli, csv_rows


@pytest.fixture
def digits(tmp_path):
    folder = tmp_path / "digits"
    shutil.copytree(EXAMPLES, folder)
    return folder


# --- 6: a summary every time --------------------------------------------------------------------
def test_classify_prints_a_summary_on_every_run_also_when_resumed(tmp_path, digits):
    out = tmp_path / "r.csv"
    first = invoke("classify", digits, *FAST, "--out", out)
    again = invoke("classify", digits, *FAST, "--out", out)
    for r in (first, again):
        assert r.exit_code == 0, r.output
        line = next(line for line in r.output.splitlines() if line.startswith("10 images: "))
        counts = dict((name, int(n)) for n, name in re.findall(r"(\d+) (\w+)", line.split(":", 1)[1].split(";")[0]))
        assert sum(counts.values()) == 10 and f"results in {out}" in line
    assert "10 of 10 images already done" in again.output


# --- 7: one image -------------------------------------------------------------------------------
def test_one_image_shows_its_top_classes_and_json_goes_to_stdout(tmp_path):
    image = next((EXAMPLES / "three").glob("*.png"))
    r = invoke("classify", image, *FAST)
    assert r.exit_code == 0, r.output
    table = [line for line in r.output.splitlines() if re.match(r"│ [1-5] ", line)]
    assert len(table) == 5 and "three" in table[0]
    assert "final decision" in table[0] and "pruned after 4 timesteps" in table[-1]

    r = runner.invoke(app, [str(image), *FAST][:0] + ["classify", str(image), *FAST, "--json", "--top-k", "2", "--quiet"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    rec = json.loads(r.stdout)
    assert rec["path"] == image.name and rec["prediction"] == "three" and rec["top"][0]["classname"] == "three"
    assert len(rec["top"]) == 2 and {"mean_error", "pruned_after"} <= set(rec["top"][0])
    assert "speed:" not in r.output and "classified" not in r.output  # --quiet
    several = invoke("classify", EXAMPLES / "three", EXAMPLES / "seven", *FAST, "--json")
    assert [x["prediction"] for x in json.loads(several.stdout)] == ["seven", "three"]


# --- 8: --limit and --sample --------------------------------------------------------------------
def test_limit_and_a_seeded_sample_for_every_run_command(tmp_path, digits):
    out = tmp_path / "l.csv"
    r = invoke("classify", digits, *FAST, "--limit", "3", "--out", out)
    assert r.exit_code == 0, r.output
    assert [g["path"] for g in rows(out)] == sorted(str(p.relative_to(digits)) for p in digits.rglob("*.png"))[:3]
    r = invoke("classify", digits, *FAST, "--limit", "5", "--out", out)  # more of the same run: resumes
    assert "3 of 5 images already done" in r.output and len(rows(out)) == 5

    a, b, c = tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "c.csv"
    assert invoke("evaluate", digits, *FAST, "--sample", "4", "--seed", "1", "--out", a).exit_code == 0
    assert invoke("evaluate", digits, *FAST, "--sample", "4", "--seed", "1", "--out", b).exit_code == 0
    assert invoke("evaluate", digits, *FAST, "--sample", "6", "--seed", "1", "--out", c).exit_code == 0
    pa, pb, pc = ({g["path"] for g in rows(x)} for x in (a, b, c))
    assert len(pa) == 4 and pa == pb and pa < pc  # seeded; a larger sample holds the smaller
    cal = invoke("calibrate", digits, *FAST, "--limit", "2", "--out", tmp_path / "cal.json")
    assert cal.exit_code == 0 and "fitted on 2 images" in cal.output
    prof = invoke("profile", digits, *FAST, "--limit", "2", "--json", tmp_path / "p.json")
    assert prof.exit_code == 0 and json.loads((tmp_path / "p.json").read_text())["n_images"] == 2


def test_an_estimate_of_the_run_time_is_printed_early(digits):
    r = invoke("classify", digits, *FAST)
    assert r.exit_code == 0
    assert re.search(r"estimate: about \d+ (s|min) more for \d+ images", r.output), r.output


# --- 9: info on a model --------------------------------------------------------------------------
def test_info_describes_a_model_and_names_a_missing_path(tmp_path):
    r = invoke("info", "demo")
    assert r.exit_code == 0 and "UNet2DConditionModel" in r.output
    assert_one_line_error(invoke("info", tmp_path / "sd21"), "does not exist", "a model")
    assert "PATH" in invoke("info", "--help").output and "engine_dir" not in invoke("info", "--help").output


# --- 10: inputs users have -----------------------------------------------------------------------
def test_an_imagefolder_metadata_csv_is_a_list(tmp_path):
    data = tmp_path / "hf"
    (data / "train").mkdir(parents=True)
    lines = ["file_name,label"]
    for name in ("three", "seven"):
        src = next((EXAMPLES / name).glob("*.png"))
        shutil.copy(src, data / "train" / src.name)
        lines.append(f"train/{src.name},{name}")
    (data / "metadata.csv").write_text("\n".join(lines) + "\n")
    r = invoke("evaluate", "--list", data / "metadata.csv", *FAST)
    assert r.exit_code == 0, r.output
    assert "top-1 accuracy: 100.00% (2/2)" in r.output


def test_urls_are_refused(tmp_path):
    assert_one_line_error(invoke("classify", "https://example.com/cat.png", *FAST), "URLs are not supported")
    listed = tmp_path / "l.txt"
    listed.write_text("http://example.com/a.png\n")
    assert_one_line_error(invoke("classify", "--list", listed, *FAST), "URLs are not supported", "line 1")


# --- 11: digits into a used folder ---------------------------------------------------------------
def test_digits_refuses_a_folder_that_holds_something(tmp_path):
    pytest.importorskip("sklearn")
    used = tmp_path / "d"
    shutil.copytree(EXAMPLES, used)
    assert_one_line_error(invoke("digits", "--out", used, "--limit", "20"), "is not empty", "10 PNG images")
    r = invoke("digits", "--out", tmp_path / "new", "--limit", "20")
    assert r.exit_code == 0 and len(list((tmp_path / "new").rglob("*.png"))) == 20


# --- 12: help text -------------------------------------------------------------------------------
def test_help_text_reads_right():
    text = invoke("classify", "--help").output
    assert "<bool>" not in text
    assert not [line for line in text.splitlines() if re.search(r"--(n-samples|to-keep) .*<str>", line)]
    assert "pip install -e" in text and "[ray]" in text  # the extra's brackets survive the markup
    flat = " ".join(text.replace("│", " ").split())
    assert re.search(r"--to-keep .*default: the model's", flat)
    assert "differs from the full-budget answer" in flat  # --error-rate says what it measures
    from diffcls.cli.export import ExportBackend, ExportPrecision

    assert [b.value for b in ExportBackend] == ["onnxruntime", "tensorrt"] and "bf16" not in [p.value for p in ExportPrecision]
    export = invoke("export", "--help").output
    assert "torch|" not in export and "bf16>" not in export and "|bf16" not in export
    assert "{out_dir}" not in invoke("digits", "--help").output
    for cmd in ("classify", "evaluate", "calibrate", "export", "merge", "digits"):
        assert "--out" in invoke(cmd, "--help").output, cmd


def test_install_hints_work_from_a_clone():
    from diffcls.errors import missing_extra

    assert 'pip install -e ".[plot]"' in str(missing_extra("matplotlib", "plot"))


def test_merge_takes_out_like_every_command(tmp_path):
    assert_one_line_error(invoke("merge", tmp_path / "only.csv"), "--out")
    shard = tmp_path / "s.csv"
    shard.write_text("x\n")
    assert_one_line_error(invoke("merge", "--out", tmp_path / "m.csv", shard), "s.csv", "diffcls classify --shard")


# --- 13: the Python API --------------------------------------------------------------------------
def test_the_python_api_is_quiet_and_gives_probabilities(tmp_path, capfd):
    from diffcls import Classifier, Schedule
    from diffcls.runtime.evaluation.calibration import Calibration
    from diffcls.runtime.data.prompts import PromptSet

    clf = Classifier.from_pretrained(use_cache=False)
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "accelerate" not in err
    digits = PromptSet.from_classes("zero,one,two,three,four,five,six,seven,eight,nine", "a handwritten digit {}")
    schedule = Schedule(n_samples=(4, 8), to_keep=(3, 1))
    cal = Calibration(temperature=0.005, model=clf.engines.fingerprint, prompts=digits.digest(), schedule=schedule.describe())
    (r,) = clf.classify([next((EXAMPLES / "three").glob("*.png"))], digits, schedule, calibration=cal)
    probs = r.probabilities()
    assert r.temperature == 0.005 and probs[0][1] == r.classname == "three"
    assert probs[0][2] == max(p for *_, p in probs) and sum(p for *_, p in probs) == pytest.approx(1.0)
    other = Calibration(temperature=0.005, model="another", prompts=digits.digest(), schedule=schedule.describe())
    from diffcls.errors import DiffclsError

    with pytest.raises(DiffclsError, match="another model"):
        clf.classify([next((EXAMPLES / "three").glob("*.png"))], digits, schedule, calibration=other)
