"""Accuracy metrics for `diffcls evaluate`: top-1 and top-5 accuracy, mean per-class accuracy,
per-class precision / recall / F1 (the numbers of scikit-learn's `classification_report`,
computed here from the confusion matrix so that evaluate needs no extra), and the confusion
matrix with its plot (scikit-learn's `ConfusionMatrixDisplay`)."""

from __future__ import annotations

from pathlib import Path

from diffcls.errors import missing_extra


def confusion_metrics(
    truth: list[int], pred: list[int], class_ids: list[int], top: list[list[int]] | None = None, k: int = 5
) -> dict:
    """`top`: per image, the class ids ranked best first (for top-k accuracy; k = 5)."""
    pos = {c: i for i, c in enumerate(class_ids)}
    n = len(class_ids)
    confusion = [[0] * n for _ in range(n)]
    for t, p in zip(truth, pred):
        confusion[pos[t]][pos[p]] += 1
    support = [sum(row) for row in confusion]
    predicted = [sum(confusion[i][j] for i in range(n)) for j in range(n)]
    recall = [(row[i] / support[i]) if support[i] else None for i, row in enumerate(confusion)]
    precision = [(confusion[j][j] / predicted[j]) if predicted[j] else None for j in range(n)]
    # as classification_report(zero_division=0): an undefined side counts 0; None when both are
    f1 = [
        None if p is None and r is None else (2 * (p or 0) * (r or 0) / ((p or 0) + (r or 0)) if (p or 0) + (r or 0) else 0.0)
        for p, r in zip(precision, recall)
    ]
    present = [a for a in recall if a is not None]
    correct = sum(confusion[i][i] for i in range(n))
    out = {
        "n": len(truth),
        "correct": correct,
        "top1": correct / len(truth) if truth else 0.0,
        "mean_per_class": sum(present) / len(present) if present else 0.0,
        "per_class": recall,  # per-class accuracy = recall (None: no image of that class)
        "precision": precision,  # None: the class was never predicted
        "recall": recall,
        "f1": f1,
        "support": support,
        "confusion": confusion,
        "class_ids": list(class_ids),
    }
    if top is not None:
        hits = sum(t in ranked[:k] for t, ranked in zip(truth, top))
        out[f"top{k}"] = hits / len(truth) if truth else 0.0
        out[f"correct_top{k}"] = hits
    return out


def confusion_figsize(n_classes: int) -> tuple[float, float]:
    """(width, height) in inches of the confusion plot (the reliability diagram beside it matches its height)."""
    side = min(4.0 + 0.45 * n_classes, 40.0)
    return side + 1.5, side


def plot_confusion(confusion: list[list[int]], names: list[str], path: str | Path, title: str = "") -> None:
    """The confusion matrix as a PNG: counts in every cell (white on dark cells), a colour bar,
    class names on both axes (scikit-learn's ConfusionMatrixDisplay)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise missing_extra("matplotlib", "plot") from None
    try:
        from sklearn.metrics import ConfusionMatrixDisplay
    except ImportError:
        raise missing_extra("scikit-learn", "plot") from None
    import numpy as np

    from matplotlib.ticker import MaxNLocator

    n = len(names)
    fig, ax = plt.subplots(figsize=confusion_figsize(n))
    disp = ConfusionMatrixDisplay(np.asarray(confusion), display_labels=names)
    disp.plot(ax=ax, cmap="Blues", colorbar=True, xticks_rotation="vertical", include_values=n <= 40, values_format="d")
    bar = disp.im_.colorbar
    if bar is not None:  # image counts: whole-number ticks
        bar.locator = MaxNLocator(integer=True)
        bar.update_ticks()
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    from diffcls.runtime.results.outputs import save_figure

    try:
        save_figure(fig, path)
    finally:
        plt.close(fig)
