"""`diffcls match` against a plain re-implementation of the reference's Winoground protocol.

`reference_eval_prob` and `reference_metrics` below are written from the protocol: each
(caption, image) pair is scored with the diffusers UNet called directly, at t = interval // 2,
interval // 2 + interval, ... < T, with the same noise for all four pairs (score = minus the mean
error); text, image and group scores as Winoground defines them, and DiffusionITM's image score
normalised by the empty prompt. Also: swapping captions or images mirrors every decision, ties,
resume of an interrupted --out run, --json, one-line errors for bad item files.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from conftest import assert_one_line_error
from diffcls.cli.app import app
from diffcls.runtime.execution.classifier import Classifier
from diffcls.runtime.evaluation.match import (
    COMPARISONS,
    ItemPolicy,
    MatchSchedule,
    adaptive_for_match,
    iter_match,
    read_items,
    summarize,
    wilson,
)
from diffcls.runtime.algorithm.schedule import AdaptiveSchedule

runner = CliRunner()
CAPTIONS = [
    ("a red circle left of a blue square", "a blue circle left of a red square", "attribute"),
    ("a circle above a square", "a square above a circle", "relation"),
    ("a small green triangle", "a small green star", "object"),
    ("a yellow star", "a purple circle", "attribute"),
    ("two dots", "one dot", "relation"),
]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def write_items(folder, rows, name="items.csv"):
    path = folder / name
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image_0", "image_1", "caption_0", "caption_1", "tag"])
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.fixture
def items_dir(tmp_path):
    """Ten 16-px PNGs (the tiny model's size) and an item file over them."""
    rng = np.random.default_rng(5)
    for i in range(2 * len(CAPTIONS)):
        Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)).save(tmp_path / f"{i}.png")
    rows = [dict(image_0=f"{2 * n}.png", image_1=f"{2 * n + 1}.png", caption_0=c0, caption_1=c1, tag=tag) for n, (c0, c1, tag) in enumerate(CAPTIONS)]
    write_items(tmp_path, rows)
    return tmp_path, rows


# --- the reference, written from the protocol ---------------------------------------------------
def reference_eval_prob(model, latent, emb, ts, noise, n_trials):
    """Minus the mean error of one (caption, image) pair over the grid; noise[k * n_trials + j]."""
    ac = model.alphas_cumprod
    errors = []
    for k, t in enumerate(ts):
        for j in range(n_trials):
            eps = noise[k * n_trials + j]
            x_t = ac[t].sqrt() * latent + (1 - ac[t]).sqrt() * eps
            with torch.no_grad():
                pred = model.unet(x_t[None], torch.tensor([t]), encoder_hidden_states=emb[None]).sample[0]
            errors.append(float(F.mse_loss(pred, eps)))
    return -sum(errors) / len(errors)


def reference_metrics(s, u):
    """Winoground's scores from s[c][i] (caption c, image i; higher fits better) and u[i] (the
    empty prompt on image i)."""
    text = s[0][0] > s[1][0] and s[1][1] > s[0][1]
    image = s[0][0] > s[0][1] and s[1][1] > s[1][0]
    norm = s[0][0] - u[0] > s[0][1] - u[1] and s[1][1] - u[1] > s[1][0] - u[0]
    return {"text": text, "image": image, "image_normalised": norm, "group": text and image}


def test_matches_the_reference_protocol(tiny, tiny_engines, items_dir):
    folder, rows = items_dir
    items = read_items(folder / "items.csv")
    schedule = MatchSchedule(t_interval=125, n_trials=2)
    ts = list(range(62, 1000, 125))
    assert schedule.grid() == ts
    torch.manual_seed(0)
    noise = torch.randn(len(ts) * 2, *tiny_engines.latent_shape)
    clf = Classifier(tiny_engines)
    got = {r.key: r for r in iter_match(clf, items, schedule, noise=noise, batch_size=7)}
    assert sorted(got) == [str(n) for n in range(len(rows))]
    with torch.no_grad():
        emb = tiny.text_encoder(tiny_engines.tokenize(["", *[c for r in rows for c in (r["caption_0"], r["caption_1"])]])).last_hidden_state
    outcomes = set()
    for n, row in enumerate(rows):
        pixels = [torch.from_numpy(np.array(Image.open(folder / row[f"image_{i}"]))).permute(2, 0, 1).float() / 127.5 - 1 for i in (0, 1)]
        with torch.no_grad():
            latents = tiny.vae.encode(torch.stack(pixels)).latent_dist.mean * tiny.scaling_factor
        s = [[reference_eval_prob(tiny, latents[i], emb[1 + 2 * n + c], ts, noise, 2) for i in (0, 1)] for c in (0, 1)]
        u = [reference_eval_prob(tiny, latents[i], emb[0], ts, noise, 2) for i in (0, 1)]
        r = got[str(n)]
        # arms: (c0, i0), (c1, i0), (empty, i0), (c0, i1), (c1, i1), (empty, i1); error = -score
        for mine, ref in zip(r.errors, [s[0][0], s[1][0], u[0], s[0][1], s[1][1], u[1]]):
            assert mine == pytest.approx(-ref, abs=1e-6)
        assert r.scores == reference_metrics(s, u)
        assert r.n_evals == 6 * len(ts) * 2
        outcomes.add(tuple(r.decisions.values()))
    assert len(outcomes) > 1  # the items are told apart, not all decided alike


FLIP = {0: 1, 1: 0, -1: -1}
# how each comparison of a swapped item maps to the original's (decisions flip sides)
SWAP_CAPTIONS = {"text_0": "text_0", "text_1": "text_1", "image_0": "image_1", "image_1": "image_0",
                 "image_normalised_0": "image_normalised_1", "image_normalised_1": "image_normalised_0"}
SWAP_IMAGES = {"text_0": "text_1", "text_1": "text_0", "image_0": "image_0", "image_1": "image_1",
               "image_normalised_0": "image_normalised_0", "image_normalised_1": "image_normalised_1"}
ARM_SWAP = {"captions": [1, 0, 2, 4, 3, 5], "images": [3, 4, 5, 0, 1, 2]}


@pytest.mark.parametrize("adaptive", [False, True], ids=["full-grid", "adaptive"])
@pytest.mark.parametrize("swap", ["captions", "images"])
def test_swapping_mirrors_every_decision(tiny_engines, items_dir, swap, adaptive):
    folder, rows = items_dir
    if swap == "captions":
        swapped = [{**r, "caption_0": r["caption_1"], "caption_1": r["caption_0"]} for r in rows]
    else:
        swapped = [{**r, "image_0": r["image_1"], "image_1": r["image_0"]} for r in rows]
    write_items(folder, swapped, "swapped.csv")
    params = AdaptiveSchedule(alpha=0.5, min_samples=3, max_samples=10, final_samples=0) if adaptive else None
    schedule = MatchSchedule(t_interval=100, adaptive=params)
    clf = Classifier(tiny_engines)

    def run(name):
        return {r.key: r for r in iter_match(clf, read_items(folder / name), schedule, seed=1, batch_size=8)}

    a, b = run("items.csv"), run("swapped.csv")
    mapping = SWAP_CAPTIONS if swap == "captions" else SWAP_IMAGES
    for key in a:
        for name in COMPARISONS:
            assert b[key].decisions[name] == FLIP[a[key].decisions[mapping[name]]], (key, name)
        assert b[key].errors == [a[key].errors[i] for i in ARM_SWAP[swap]]  # bit for bit
        assert b[key].n_evals == a[key].n_evals
    if adaptive:  # the test stopped some comparisons early: the mirror holds there too
        assert min(r.n_evals for r in a.values()) < 6 * 10


def test_identical_captions_are_a_tie(tmp_path, tiny_dir, items_dir):
    folder, rows = items_dir
    rows = [*rows[:2], {**rows[2], "caption_1": rows[2]["caption_0"]}]
    path = write_items(folder, rows, "tie.csv")
    items = read_items(path)
    assert [it.text_tie for it in items] == [False, False, True]
    out = tmp_path / "r.csv"
    r = invoke("match", path, "--model", tiny_dir, "--t-interval", "250", "--out", out, "--json", tmp_path / "m.json", "--no-cache")
    assert r.exit_code == 0, r.output
    assert "1 item(s) with identical captions" in r.output
    tie = next(row for row in csv.DictReader(open(out)) if row["item"] == "2")
    assert (tie["text_0"], tie["text_1"], tie["text"], tie["group"], tie["tie"]) == ("-1", "-1", "0", "0", "text")
    assert tie["error_c0_i0"] == tie["error_c1_i0"]  # the same caption: the same errors
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["overall"]["text_ties"] == 1 and m["overall"]["n"] == 3


def test_json_and_plot_hold_every_number(tmp_path, tiny_dir, items_dir):
    folder, rows = items_dir
    out, js, png = tmp_path / "r.csv", tmp_path / "m.json", tmp_path / "s.png"
    errs = tmp_path / "e.jsonl"
    r = invoke("match", folder / "items.csv", "--model", tiny_dir, "--t-interval", "200", "--out", out, "--json", js, "--plot", png,
               "--save-errors", errs, "--no-cache")
    assert r.exit_code == 0, r.output
    records = [json.loads(line) for line in errs.read_text().splitlines()]
    assert sorted(x["item"] for x in records) == [str(n) for n in range(len(rows))]
    for rec in records:  # every arm at every grid timestep, its mean the row's error
        assert sorted((a, t) for a, t, _, _ in rec["errors"]) == [(a, t) for a in range(6) for t in range(100, 1000, 200)]
        row = next(x for x in csv.DictReader(open(out)) if x["item"] == rec["item"])
        arm0 = [e for a, _, _, e in rec["errors"] if a == 0]
        assert float(row["error_c0_i0"]) == pytest.approx(sum(arm0) / len(arm0), rel=1e-8)
    m = json.loads(js.read_text())
    rows_out = list(csv.DictReader(open(out)))
    assert len(rows_out) == len(rows)
    assert set(m["by_tag"]) == {"attribute", "relation", "object"}
    for name, part in [("overall", m["overall"]), *m["by_tag"].items()]:
        mine = rows_out if name == "overall" else [x for x in rows_out if x["tag"] == name]
        assert part["n"] == len(mine)
        for score in ("text", "image", "image_normalised", "group"):
            k = sum(int(x[score]) for x in mine)
            assert part[score] == pytest.approx(k / len(mine))
            assert part[f"{score}_ci95"] == pytest.approx(list(wilson(k, len(mine))))
        assert part["evals_per_item"] == 6 * 5
    assert m["chance"]["group"] == pytest.approx(1 / 6)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_after_an_interrupted_run(tmp_path, tiny_dir, items_dir, monkeypatch):
    from diffcls.runtime.evaluation import match as match_mod

    folder, rows = items_dir
    args = ["match", folder / "items.csv", "--model", tiny_dir, "--t-interval", "200", "--batch-size", "4", "--no-cache"]
    full = tmp_path / "full.csv"
    assert invoke(*args, "--out", full).exit_code == 0
    out = tmp_path / "r.csv"
    real, calls = match_mod.MatchResultsWriter.write_item, []

    def killed_after_two(self, result):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(result.key)
        real(self, result)

    monkeypatch.setattr(match_mod.MatchResultsWriter, "write_item", killed_after_two)
    r = invoke(*args, "--out", out)
    assert r.exit_code == 130 and "resume" in r.output
    assert len(list(csv.DictReader(open(out)))) == 2
    monkeypatch.setattr(match_mod.MatchResultsWriter, "write_item", real)
    with open(out, "a") as f:
        f.write('"4",relation,1.0')  # and a row torn by the kill
    r = invoke(*args, "--out", out)
    assert r.exit_code == 0, r.output
    assert "2 of 5 items already done" in r.output
    got = sorted(csv.DictReader(open(out)), key=lambda x: x["item"])
    assert got == sorted(csv.DictReader(open(full)), key=lambda x: x["item"])  # one row per item, nothing lost
    assert not (tmp_path / "r.csv.lock").exists()


def test_adaptive_policy_stops_early_and_agrees_when_clear():
    """ItemPolicy with synthetic errors: clear comparisons stop soon after the first stage; level
    ones run the whole grid and are then the full-grid decision (at a strict alpha: the default
    0.8 is a constant tuned for cost and may stop a level comparison early)."""
    rng = np.random.default_rng(3)
    G = 50  # t_interval 20
    base = [1.0, 1.0, 1.1, 1.3, 1.0, 1.1]  # per arm: text_0, image_1 and image_normalised_1 are level
    common = rng.standard_normal(G)  # a shared per-timestep level, as real errors have
    table = {(a, k): base[a] + common[k] + 0.05 * rng.standard_normal() for a in range(6) for k in range(G)}
    full = ItemPolicy(list(range(6)), list(range(6)), MatchSchedule(t_interval=20), set())
    policy = ItemPolicy(list(range(6)), list(range(6)), MatchSchedule(t_interval=20, adaptive=adaptive_for_match(G, error_rate=0.05, min_samples=8)), set())
    for pol in (full, policy):
        while not pol.done:
            for a, k, j in pol.next_block():
                pol.feed(a, k, j, table[(a, k)])
    assert full.n_evals == 6 * G
    assert policy.n_evals < full.n_evals
    for name in ("text_1", "image_0", "image_normalised_0"):  # clear: settled early, rightly
        assert policy.tests[name].r < G / 2 and policy.decisions()[name] == full.decisions()[name] == 0
    for name in ("text_0", "image_1", "image_normalised_1"):  # level: the whole grid, its decision
        assert policy.tests[name].r == G and policy.decisions()[name] == full.decisions()[name]


@pytest.mark.parametrize(
    "content, fragment",
    [
        ("image_0,image_1,caption_0,tag\na.png,b.png,x,t\n", "no column caption_1"),
        ("image_0,image_1,caption_0,caption_1\nmissing.png,0.png,x,y\n", "image_0 missing.png is not a file"),
        ("image_0,image_1,caption_0,caption_1\n", "has no items"),
    ],
)
def test_malformed_item_files_give_one_line_errors(tmp_path, tiny_dir, items_dir, content, fragment):
    folder, _ = items_dir
    path = folder / "bad.csv"
    path.write_text(content)
    r = invoke("match", path, "--model", tiny_dir, "--no-cache")
    assert_one_line_error(r, str(path), fragment)


def test_jsonl_items_and_a_bad_line(tmp_path, tiny_dir, items_dir):
    folder, rows = items_dir
    path = folder / "items.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    items = read_items(path)
    assert [it.caption_0 for it in items] == [rows[0]["caption_0"], rows[1]["caption_0"]]
    path.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"image_0": "0.png"}) + "\n")
    assert_one_line_error(invoke("match", path, "--model", tiny_dir, "--no-cache"), str(path), "line 2 has no image_1")


def test_hugging_face_dataset_on_disk(tmp_path, tiny_engines, items_dir):
    """A Winoground-layout data set saved with save_to_disk scores as the same items from a CSV."""
    datasets = pytest.importorskip("datasets", reason="the datasets extra is not installed")
    folder, rows = items_dir
    data = {
        "id": list(range(len(rows))),
        "image_0": [Image.open(folder / r["image_0"]).convert("RGB") for r in rows],
        "image_1": [Image.open(folder / r["image_1"]).convert("RGB") for r in rows],
        "caption_0": [r["caption_0"] for r in rows],
        "caption_1": [r["caption_1"] for r in rows],
        "collapsed_tag": [r["tag"] for r in rows],
    }
    features = datasets.Features({"id": datasets.Value("int32"), "image_0": datasets.Image(), "image_1": datasets.Image(),
                                  "caption_0": datasets.Value("string"), "caption_1": datasets.Value("string"), "collapsed_tag": datasets.Value("string")})
    ds = datasets.Dataset.from_dict(data, features=features)
    ds.save_to_disk(str(tmp_path / "wino"))
    (tmp_path / "parquet").mkdir()
    ds.to_parquet(str(tmp_path / "parquet" / "test-00000-of-00001.parquet"))  # the hub's layout
    from_parquet = read_items(tmp_path / "parquet")
    assert [(it.key, it.caption_1, it.tag, it.digests) for it in from_parquet] == [(it.key, it.caption_1, it.tag, it.digests) for it in read_items(tmp_path / "wino")]
    schedule = MatchSchedule(t_interval=250)
    clf = Classifier(tiny_engines)
    hf = {r.key: r for r in iter_match(clf, read_items(tmp_path / "wino"), schedule, batch_size=8)}
    plain = {r.key: r for r in iter_match(clf, read_items(folder / "items.csv"), schedule, batch_size=8)}
    assert hf.keys() == plain.keys()
    for k in hf:
        assert hf[k].tag == plain[k].tag
        assert hf[k].decisions == plain[k].decisions
        assert hf[k].errors == pytest.approx(plain[k].errors, abs=1e-7)


def test_wilson_interval_and_summary():
    lo, hi = wilson(8, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.4902, 0.9433)  # the textbook value
    assert wilson(0, 0) == (0.0, 1.0)
    for n in range(1, 60):  # the interval holds the proportion; 0 and n are at the ends exactly
        assert wilson(0, n)[0] == 0.0 and wilson(n, n)[1] == 1.0
        assert all(wilson(k, n)[0] <= k / n <= wilson(k, n)[1] for k in range(n + 1))
    assert summarize([])["overall"]["n"] == 0


def test_adaptive_cli_reports_agreement_with_the_full_grid(tmp_path, tiny_dir, items_dir):
    folder, rows = items_dir
    base = ["match", folder / "items.csv", "--model", tiny_dir, "--t-interval", "100", "--no-cache"]
    full = tmp_path / "full.csv"
    assert invoke(*base, "--out", full).exit_code == 0
    js = tmp_path / "a.json"
    r = invoke(*base, "--adaptive", "--error-rate", "0.5", "--min-samples", "3", "--compare", full, "--json", js)
    assert r.exit_code == 0, r.output
    assert "agreement with" in r.output
    m = json.loads(js.read_text())
    a = m["agreement"]
    assert a["n_items"] == len(rows) and a["comparisons"] == 6 * len(rows)
    assert a["reference_evals_per_item"] == 6 * 10 and 6 * 3 <= a["evals_per_item"] <= 6 * 10
    assert m["overall"]["evals_per_item"] == a["evals_per_item"]
    assert "adaptive rule=mixture alpha=0.5 min_samples=3 max_samples=10" in m["schedule"]
    assert_one_line_error(invoke(*base, "--error-rate", "0.1"), "--error-rate applies to --adaptive only")
    assert_one_line_error(invoke(*base, "--adaptive", "--max-samples", "11"), "--max-samples 11 exceeds the 10 timesteps")


def test_the_score_table_fits_80_columns_with_its_widest_numbers():
    """Every cell at its widest ("100.0" with the interval "(51-100)") and a long tag: no number is
    cut to an ellipsis on an 80-column terminal (the Python API's `summary_view`, which match prints)."""
    import io

    from rich.console import Console

    from diffcls.runtime.evaluation.match import summary_view

    widest = {"n": 100, "evals_per_item": 1200, "text_ties": 0, "image_ties": 0}
    for k in ("text", "image", "image_normalised", "group"):
        widest |= {k: 1.0, f"{k}_ci95": (0.51, 1.0)}
    summary = {"overall": widest, "by_tag": {"attribute": widest, "relation": widest}}
    con = Console(width=80, file=io.StringIO(), record=True)
    con.print(summary_view(summary, MatchSchedule(t_interval=5)))
    shown = con.export_text()
    assert "100.0" in shown and "(51-100)" in shown and "…" not in shown
    assert shown.splitlines()[0] == MatchSchedule(t_interval=5).describe() and "chance: text 25%" in shown


def test_results_are_bound_to_the_schedule_values_not_its_wording():
    """The results file's settings hold `to_dict` (plain values), so rewording `describe` cannot
    break a resume, and two schedules that differ in any value differ there."""
    from diffcls.runtime.evaluation.match import MatchSchedule

    a, b = MatchSchedule(t_interval=5), MatchSchedule(t_interval=20)
    assert a.to_dict() == MatchSchedule(t_interval=5).to_dict() != b.to_dict()
    adaptive = MatchSchedule(adaptive=AdaptiveSchedule(alpha=0.05, final_samples=0)).to_dict()
    assert adaptive["adaptive"]["alpha"] == 0.05 and json.loads(json.dumps(adaptive)) == adaptive



def test_match_help_states_the_runtime_defaults():
    """The CLI spells match --adaptive's defaults in its help (it does not import the runtime to
    start fast); they must be the ones `adaptive_for_match` uses."""
    from diffcls.runtime.evaluation.match import MATCH_ALPHA, MATCH_N0, adaptive_for_match

    r = CliRunner().invoke(app, ["match", "--help"], env={"COLUMNS": "300"})
    assert f"default {MATCH_ALPHA:g}," in r.output and f"(default {MATCH_N0})" in r.output
    a = adaptive_for_match(50)
    assert (a.alpha, a.min_samples) == (MATCH_ALPHA, MATCH_N0)
