"""Figures of the run report, as base64 PNG strings (matplotlib, Agg backend).

Only two kinds of picture are drawn: curves of aggregate numbers from
``metrics.jsonl`` and pictures of the coordinator's own central test set.
Nothing here ever sees a hospital's images.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

Series = Mapping[str, Sequence[tuple[int, float]]]


def to_base64_png(fig: Figure) -> str:
    """Render ``fig`` to PNG (100 dpi), close it and return the bytes as base64 text."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def round_curves(series: Series, *, title: str, ylabel: str,
                 selected_round: int | None = None) -> str:
    """One line per hospital of a metric over rounds.

    Args:
        series: hospital name -> [(round, value), ...]; ``overall`` and
            ``central`` are drawn dashed.
        title: the figure's title.
        ylabel: the metric's name (and unit).
        selected_round: drawn as a vertical dotted line when given.
    """
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    aggregate = {"overall": "black", "central": "dimgrey"}
    hospitals = sorted(n for n in series if n not in aggregate)
    palette = plt.get_cmap("tab10")
    for name, points in sorted(series.items()):
        rounds = [p[0] for p in points]
        values = [p[1] for p in points]
        # the same hospital has the same colour in every figure of the report
        colour = aggregate.get(name) or palette(hospitals.index(name) % 10)
        style = "--" if name in aggregate else "-"
        ax.plot(rounds, values, style, marker="o", markersize=3, label=name, color=colour)
    if selected_round is not None:
        ax.axvline(selected_round, color="grey", linestyle=":", label="selected round")
    ax.set(title=title, xlabel="round", ylabel=ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return to_base64_png(fig)


def roc_points(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False and true positive rates at every distinct score, from (0, 0) to (1, 1).

    Args:
        scores: float [N], higher means more likely positive.
        positive: bool [N].
    """
    order = np.argsort(-scores, kind="stable")
    hits = positive[order].astype(float)
    distinct = np.r_[np.diff(scores[order]) != 0, True]
    tp = np.cumsum(hits)[distinct]
    fp = np.cumsum(1.0 - hits)[distinct]
    tpr = np.r_[0.0, tp / max(hits.sum(), 1.0)]
    fpr = np.r_[0.0, fp / max((1.0 - hits).sum(), 1.0)]
    return fpr, tpr


def roc_figure(probs: np.ndarray, labels: np.ndarray, class_names: Sequence[str]) -> str:
    """ROC curve of the positive class (two classes) or one-vs-rest per class.

    Args:
        probs: float [N, K] class probabilities.
        labels: int [N] true classes.
        class_names: K display names.
    """
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    classes = [1] if probs.shape[1] == 2 else range(probs.shape[1])
    for k in classes:
        fpr, tpr = roc_points(probs[:, k], labels == k)
        ax.plot(fpr, tpr, label=f"{class_names[k]} (AUC {np.trapezoid(tpr, fpr):.3f})")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(title="ROC, central test set", xlabel="false positive rate (1 - specificity)",
           ylabel="true positive rate (sensitivity)", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(fontsize=8, loc="lower right")
    return to_base64_png(fig)


def calibration_bins(confidence: np.ndarray, correct: np.ndarray, bins: int = 10
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean predicted probability, observed frequency and count per probability bin.

    Args:
        confidence: float [N] in [0, 1].
        correct: bool [N], whether the event predicted with ``confidence`` happened.
        bins: equal-width bins over [0, 1]; empty bins are left out.
    """
    index = np.minimum((confidence * bins).astype(int), bins - 1)
    counts = np.bincount(index, minlength=bins)
    keep = counts > 0
    mean_p = np.bincount(index, weights=confidence, minlength=bins)[keep] / counts[keep]
    freq = np.bincount(index, weights=correct.astype(float), minlength=bins)[keep] / counts[keep]
    return mean_p, freq, counts[keep]


def calibration_figure(probs: np.ndarray, labels: np.ndarray) -> str:
    """Reliability diagram: P(positive) for two classes, top-class confidence otherwise."""
    if probs.shape[1] == 2:
        confidence, correct, what = probs[:, 1], labels == 1, "predicted P(positive)"
    else:
        confidence = probs.max(axis=1)
        correct, what = probs.argmax(axis=1) == labels, "top-class confidence"
    mean_p, freq, counts = calibration_bins(confidence, correct)
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    ax.plot([0, 1], [0, 1], ":", color="grey", label="perfectly calibrated")
    ax.plot(mean_p, freq, marker="o", label="central test set")
    for x, y, n in zip(mean_p, freq, counts, strict=True):
        ax.annotate(str(int(n)), (x, y), fontsize=7, textcoords="offset points", xytext=(3, -9))
    ax.set(title="Calibration (10 bins, n per bin)", xlabel=what, ylabel="observed frequency",
           xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(fontsize=8, loc="upper left")
    return to_base64_png(fig)


def confusion_counts(predicted: np.ndarray, labels: np.ndarray, classes: int) -> np.ndarray:
    """int [K, K] counts, rows true class, columns predicted class."""
    return np.bincount(labels * classes + predicted, minlength=classes * classes
                       ).reshape(classes, classes)


def confusion_figure(matrix: np.ndarray, class_names: Sequence[str], *, caption: str) -> str:
    """Confusion matrix heat map with the count in every cell."""
    fig, ax = plt.subplots(figsize=(4.4, 4.0))
    ax.imshow(matrix, cmap="Blues")
    for (row, col), count in np.ndenumerate(matrix):
        colour = "white" if count > matrix.max() / 2 else "black"
        ax.text(col, row, str(count), ha="center", va="center", color=colour)
    ticks = range(len(class_names))
    ax.set_xticks(ticks, class_names, fontsize=8)
    ax.set_yticks(ticks, class_names, fontsize=8)
    ax.set(title=caption, xlabel="predicted", ylabel="true")
    return to_base64_png(fig)


def slices_figure(images: np.ndarray, truth: np.ndarray, pred: np.ndarray) -> str:
    """Central-test slices: image, true mask and predicted mask side by side.

    Args:
        images: float [S, C, H, W] (the first channel is shown).
        truth: uint8 [S, H, W] true labels (0 = background).
        pred: uint8 [S, H, W] predicted labels.
    """
    count = images.shape[0]
    fig, axes = plt.subplots(count, 3, figsize=(7.5, 2.6 * count), squeeze=False)
    for s in range(count):
        for col, (mask, title) in enumerate(((None, "image"), (truth[s], "true mask"),
                                             (pred[s], "predicted mask"))):
            ax = axes[s][col]
            ax.imshow(images[s, 0], cmap="gray")
            if mask is not None:
                ax.imshow(np.ma.masked_equal(mask, 0), cmap="autumn", alpha=0.45,
                          vmin=0, vmax=max(int(mask.max()), 1))
            ax.set_title(f"slice {s}: {title}", fontsize=8)
            ax.axis("off")
    return to_base64_png(fig)

