"""Accuracy metrics for `diffcls evaluate`: top-1, mean per-class accuracy, confusion matrix."""

from __future__ import annotations

from pathlib import Path

from diffcls.errors import missing_extra


def confusion_metrics(truth: list[int], pred: list[int], class_ids: list[int]) -> dict:
    pos = {c: i for i, c in enumerate(class_ids)}
    n = len(class_ids)
    confusion = [[0] * n for _ in range(n)]
    for t, p in zip(truth, pred):
        confusion[pos[t]][pos[p]] += 1
    per_class = [(row[i] / sum(row)) if sum(row) else None for i, row in enumerate(confusion)]
    present = [a for a in per_class if a is not None]
    correct = sum(confusion[i][i] for i in range(n))
    return {
        "n": len(truth),
        "correct": correct,
        "top1": correct / len(truth) if truth else 0.0,
        "mean_per_class": sum(present) / len(present) if present else 0.0,
        "per_class": per_class,
        "confusion": confusion,
        "class_ids": list(class_ids),
    }


def plot_confusion(confusion: list[list[int]], names: list[str], path: str | Path, title: str = "") -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise missing_extra("matplotlib", "plot") from None
    n = len(names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.5 * n, 1.0 + 0.5 * n))
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(n), names, rotation=90)
    ax.set_yticks(range(n), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(n):
        for j in range(n):
            if confusion[i][j]:
                ax.text(j, i, str(confusion[i][j]), ha="center", va="center", fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
