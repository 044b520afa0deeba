"""Evaluation over a finished job: labels -> classes, accuracy metrics, probability calibration.

What `diffcls evaluate` and `diffcls calibrate` compute, as functions of a `ClassifyJob`'s
outcomes (`job.results`, keyed like the results file) and its truth (`job.truth`: key -> true
classidx), so the Python API computes the same numbers.
"""

from __future__ import annotations

import re
from enum import Enum
from pathlib import Path

from diffcls.errors import DiffclsError

LABEL_COLUMNS = ("label", "correct")  # evaluate's extra results columns: true class name, 1 or 0


class LabelKind(str, Enum):
    name = "name"  # folder / label text is the class name
    index = "index"  # folder / label text is the class index (0, 1, ...: the prompts' classidx)


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", name.strip().lower())


def label_ids(names: list[str], kind: LabelKind, pset, where: str, what: str = "subfolders") -> dict[str, int]:
    """Raw label text (folder name / CSV label) -> classidx; a one-line error for unknown ones."""
    if kind == LabelKind.index:
        ids, bad = {}, []
        for name in names:
            try:
                ids[name] = int(name)
            except ValueError:
                bad.append(name)
            else:
                if ids[name] not in pset.classes:
                    bad.append(name)
        if bad:
            raise DiffclsError(
                f"{what} {', '.join(bad[:5])} of {where} are not class indices of the prompts "
                f"({min(pset.classes)}..{max(pset.classes)}); fix them, or use --labels name"
            )
        return ids
    by_name = {_norm(name): idx for idx, name in pset.classes.items()}
    unknown = [n for n in names if _norm(n) not in by_name]
    if unknown:
        hint = "; the labels are numbers: pass --labels index" if all(u.isdigit() for u in unknown) else "; rename them or fix the prompts"
        raise DiffclsError(
            f"{what} {', '.join(unknown[:5])} of {where} match no class name "
            f"({', '.join(list(pset.classes.values())[:10])}){hint}"
        )
    return {n: by_name[_norm(n)] for n in names}


def scored_truth(job) -> dict[str, int]:
    """key -> true classidx of the labeled images that have an outcome (a one-line error if none)."""
    truth = {k: t for k, t in job.truth.items() if k in job.results}
    if not truth:
        raise DiffclsError(f"no labeled image of {job.describe_inputs()} was classified")
    return truth


def top_ids(outcome) -> list[int]:
    """The class ids of an outcome's ranking (runtime.algorithm.ranking), best first."""
    return [c.classidx for c in outcome.ranked or []]


def evals_per_image(results: dict, keys=None) -> float | None:
    """Mean UNet evaluations per image over `keys` (default: all results) that record it."""
    counts = [results[k].n_evals for k in (results if keys is None else keys) if results[k].n_evals is not None]
    return sum(counts) / len(counts) if counts else None


def accuracy_metrics(job) -> dict:
    """top-1/top-5, per-class precision/recall/f1, the confusion matrix, evaluations per image."""
    from diffcls.runtime.evaluation.metrics import confusion_metrics

    truth = scored_truth(job)
    m = confusion_metrics(
        [truth[k] for k in truth],
        [job.results[k].classidx for k in truth],
        list(job.prompts.classes),
        top=[top_ids(job.results[k]) for k in truth],
    )
    m["evals_per_image"] = evals_per_image(job.results, truth)
    return m


def decisions(results: dict, truth: dict):
    """Per labeled image whose ranking is known: (key, the listed final-decision classes' mean
    errors, the prediction's first; the true class's position among them, None when it was
    pruned or not listed: probability 0)."""
    for key, label in truth.items():
        ranked = results[key].ranked
        if ranked:
            final = [c for c in ranked if c.in_final]
            ids = [c.classidx for c in final]
            yield key, [c.mean_error for c in final], (ids.index(label) if label in ids else None)


def calibration_metrics(results: dict, truth: dict, temperature: float | None) -> dict | None:
    """NLL of the true class and ECE of the predicted class's probability (runtime.algorithm.ranking: the
    prediction's is the highest), over the images whose ranking is known."""
    from diffcls.runtime.evaluation.calibration import UNCALIBRATED, expected_calibration_error, nll, softmax_neg

    t = UNCALIBRATED if temperature is None else temperature
    keys, lists, pos = [], [], []
    for key, means, p in decisions(results, truth):
        keys.append(key), lists.append(means), pos.append(p)
    if not lists:
        return None
    conf = [softmax_neg(means, t)[0] for means in lists]
    correct = [results[k].classidx == truth[k] for k in keys]
    return {"temperature": t, "n": len(lists), "nll": nll(lists, pos, t), "ece": expected_calibration_error(conf, correct),
            "confidence": conf, "correct": correct}


def fit_calibration(job):
    """The temperature of minimum NLL on the job's labeled images (`diffcls calibrate`)."""
    from diffcls.runtime.evaluation.calibration import UNCALIBRATED, Calibration, fit_temperature, nll

    truth = scored_truth(job)
    before = calibration_metrics(job.results, truth, None)
    if before is None:
        raise DiffclsError(f"no image of {job.describe_inputs()} has a ranking to fit on; pass another --results to recompute")
    lists = [(means, p) for _, means, p in decisions(job.results, truth)]
    scores, pos = [m for m, _ in lists], [p for _, p in lists]
    t = fit_temperature(scores, pos)
    after = calibration_metrics(job.results, truth, t)
    return Calibration(
        temperature=t,
        n_images=len(scores),
        nll_before=nll(scores, pos, UNCALIBRATED),
        nll_after=nll(scores, pos, t),
        ece_before=before["ece"],
        ece_after=after["ece"],
        schedule=job.schedule.to_dict(),
        model=job.executor.info["fingerprint"],
        prompts=job.prompts.digest(),
    )


def evaluation(job) -> tuple[dict, dict | None]:
    """(accuracy metrics, calibration metrics or None) of a finished labelled job."""
    return accuracy_metrics(job), calibration_metrics(job.results, scored_truth(job), job.temperature)


def evaluation_report(job, m: dict, cal: dict | None) -> dict:
    """`evaluate --json`: the metrics, the schedule, the classes, what was skipped, the settings."""
    report = {**m, "schedule": job.schedule.describe(), "classes": job.prompts.classes, "n_skipped": len(job.skipped),
              "n_unlabeled": job.n_unlabeled, "settings": job.record()}
    if cal is not None:
        report["calibration"] = {k: v for k, v in cal.items() if k not in ("confidence", "correct")}
    return report


def check_outputs(out: Path | None, save_errors: Path | None, json_out: Path | None, plot: Path | None) -> list[Path]:
    """`evaluate`'s outputs checked before the run (runtime.results.outputs: whose file, never two
    in one); returns them, for the job to leave out of its inputs."""
    from diffcls.runtime.results.outputs import check_distinct, check_output

    rel = reliability_path(plot)
    outputs = (("--out", out), ("--save-errors", save_errors), ("--json", json_out), ("--plot", plot), ("--plot's reliability diagram", rel))
    check_output(json_out, "--json", "metrics")
    check_output(plot, "--plot", "png")
    check_output(rel, "--plot (its -reliability.png)", "png")
    check_distinct(*outputs)
    return [p for _, p in outputs]


def metrics_lines(m: dict) -> list[str]:
    """Accuracy in a few lines: top-1, top-5, mean per class, UNet evaluations per image."""
    lines = [f"top-1 accuracy: {100 * m['top1']:.2f}% ({m['correct']}/{m['n']})"]
    if "top5" in m:
        lines.append(f"top-5 accuracy: {100 * m['top5']:.2f}% ({m['correct_top5']}/{m['n']})")
    lines.append(f"mean per-class accuracy: {100 * m['mean_per_class']:.2f}%")
    if m.get("evals_per_image") is not None:
        lines.append(f"UNet evaluations per image: {m['evals_per_image']:.1f}")
    return lines


def metrics_view(m: dict, classes: dict[int, str]):
    """`evaluation(job)`'s metrics as rich renderables (`rich.print(metrics_view(m, job.prompts.classes))`):
    `metrics_lines`, then per-class precision/recall and the confusion matrix (up to 30 classes)."""
    from rich.table import Table

    from diffcls.render import lines, pct, table

    names = [classes[i] for i in m["class_ids"]]
    if len(names) > 30:
        return lines(*metrics_lines(m), f"per-class precision/recall and confusion matrix: {len(names)} classes, too many to print; see --json / --plot")
    per_class = table(("class", "precision", "recall", "f1", "images"), left=("class",),
                      rows=[(f"{i} {name}", pct(p), pct(r), pct(f), str(n)) for i, name, p, r, f, n in zip(m["class_ids"], names, m["precision"], m["recall"], m["f1"], m["support"])],
                      title="per class (precision: of the images predicted as the class, recall: of its images)")
    # columns are headed by class id so the counts stay readable in an 80-column terminal
    confusion = Table(title="confusion (rows: true, columns: predicted class id)")
    confusion.add_column("true class", no_wrap=True)
    for i in m["class_ids"]:
        confusion.add_column(str(i), justify="right", no_wrap=True)
    confusion.add_column("acc", justify="right", no_wrap=True, min_width=4)
    for i, name, row, acc in zip(m["class_ids"], names, m["confusion"], m["per_class"]):
        confusion.add_row(f"{i} {name}", *map(str, row), pct(acc))
    return lines(*metrics_lines(m), per_class, confusion)


def schedule_note(schedule) -> str | None:
    """An adaptive schedule set by --error-rate: what that number was measured to mean."""
    from diffcls.runtime.algorithm.schedule import AdaptiveSchedule

    if not isinstance(schedule, AdaptiveSchedule) or schedule.alpha is not None:
        return None
    return (f"--error-rate {schedule.error_rate:g}: the test runs at alpha {schedule.resolved_alpha:g}; measured on digits train replays, "
            f"P(answer differs from the full-budget answer) <= {schedule.error_rate:g} at the default settings (docs/adaptive.md)")


def calibration_line(cal: dict, temperature: float | None, source) -> str:
    """The probabilities' NLL and ECE, and where their temperature came from (`source`)."""
    how = f"temperature {temperature:.4g} from {source}" if temperature is not None else "uncalibrated, temperature 1; fit one with diffcls calibrate"
    return f"probabilities ({how}): NLL {cal['nll']:.4f}, ECE {100 * cal['ece']:.2f}% (15 bins, {cal['n']} images)"


def reliability_path(plot: Path | None) -> Path | None:
    """The reliability diagram beside a confusion-matrix PNG (none beside a device or pipe such as /dev/stdout)."""
    from diffcls.runtime.results.outputs import target_kind

    if plot is None or target_kind(plot) == "stream":
        return None
    return plot.with_name(plot.stem + "-reliability.png")


def write_plots(plot: Path, m: dict, cal: dict | None, classes: dict, temperature: float | None, what: str) -> list[Path]:
    """The confusion matrix at `plot` and (with probabilities) the reliability diagram beside it, at
    its height; `what`: 'MODEL on IMAGES' for the titles. Returns the files written."""
    from diffcls.runtime.evaluation.metrics import confusion_figsize, plot_confusion
    from diffcls.runtime.results.outputs import output_errors

    with output_errors("--plot", plot):
        plot_confusion(m["confusion"], [classes[i] for i in m["class_ids"]], plot, title=f"{what}: top-1 {100 * m['top1']:.1f}% ({m['correct']}/{m['n']})")
    rel = reliability_path(plot)
    if cal is None or rel is None:
        return [plot]
    from diffcls.runtime.evaluation.calibration import plot_reliability

    label = f"T={temperature:.4g}" if temperature is not None else "uncalibrated (T=1)"
    with output_errors("--plot", rel):
        plot_reliability(cal["confidence"], cal["correct"], rel, title=f"{what}, {label}: ECE {100 * cal['ece']:.2f}%, NLL {cal['nll']:.3f}",
                         height=confusion_figsize(len(m["class_ids"]))[1])
    return [plot, rel]


def fit_weights_calibration(job, errors_jsonl, n_bands: int):
    """Timestep weights (`diffcls calibrate --timestep-weights`) from the job's labelled images'
    errors (its --save-errors JSONL), bound to the model and prompts."""
    import json
    from pathlib import Path

    from diffcls.runtime.evaluation.calibration import UNCALIBRATED, Calibration, fit_timestep_weights

    truth = scored_truth(job)
    ids = list(job.prompts.classidx)
    images = []
    for line in Path(errors_jsonl).read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        key = rec.get("key", rec.get("path"))
        if key in truth:
            images.append(([tuple(e) for e in rec["errors"]], [i for i, c in enumerate(ids) if c == truth[key]]))
    T = job.executor.info.get("num_train_timesteps", 1000) if hasattr(job, "executor") else 1000
    weights, fit = fit_timestep_weights(images, n_bands, T)
    return Calibration(temperature=UNCALIBRATED, n_images=len(images), schedule=job.schedule.to_dict(), model=job.executor.info["fingerprint"],
                       prompts=job.prompts.digest(), timestep_weights=weights, weights_fit=fit)


def disagreement(job, other_csv) -> dict:
    """How many of the job's answers differ from another results CSV's for the same images
    (`evaluate --compare`), with a 95% Wilson interval; images missing there are left out."""
    import csv
    import math

    from diffcls.runtime.results.writer import ENCODING

    try:
        with open(other_csv, newline="", **ENCODING) as f:
            theirs = {row["path"]: row["prediction"] for row in csv.DictReader(f)}
    except (OSError, KeyError, csv.Error) as e:
        raise DiffclsError(f"--compare {other_csv} is not a results CSV ({type(e).__name__}); give the --out CSV of another run on these images") from None
    both = [k for k in job.results if k in theirs]
    if not both:
        raise DiffclsError(f"--compare {other_csv} shares no image with this run; give the --out CSV of a run on the same images")
    k = sum(job.results[key].prediction != theirs[key] for key in both)
    n, z = len(both), 1.96
    p = k / n
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return {"n": n, "differ": k, "rate": p, "ci95": [max(0.0, centre - half), min(1.0, centre + half)], "reference": str(other_csv)}


def disagreement_line(d: dict) -> str:
    """`disagreement`'s numbers in a line."""
    lo, hi = d["ci95"]
    return f"answers that differ from {d['reference']}: {d['differ']} of {d['n']} ({100 * d['rate']:.2f}%, 95% {100 * lo:.2f}-{100 * hi:.2f}%)"
