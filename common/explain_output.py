"""Writing explanations into a local folder: one PNG per image and ``predictions.csv``.

Used by ``python -m client explain`` (a hospital's own images; nothing is
sent anywhere) and ``python -m server.explain`` (the coordinator's central
test set).
"""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from common.atomic import atomic_file
from common.explain import Explainer, Explanation
from common.overlay import explanation_png, save_png

CSV_NAME = "predictions.csv"
BATCH = 16


def _file_stem(name: str, index: int) -> str:
    """A safe PNG name for sample ``index`` called ``name``."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).name)
    stem = re.sub(r"(\.nii)?\.(png|jpe?g|dcm|dicom|nii|gz)$", "", stem, flags=re.I)
    return f"{index:05d}_{stem or 'image'}"


def _row(name: str, label: int | None, result: Explanation, png: str) -> dict[str, object]:
    row: dict[str, object] = {"sample": name, "true_label": "" if label is None else label,
                              "predicted": result.predicted, "explained_class": result.explained}
    row.update({f"prob_{k}": f"{p:.6f}" for k, p in enumerate(result.probs)})
    row.update({f"peak_{axis}": index for axis, index in enumerate(result.peak)})
    row["png"] = png
    return row


def write_explanations(explainer: Explainer, images: torch.Tensor,
                       labels: Sequence[int | None], names: Sequence[str], out: Path, *,
                       class_idx: int | None = None) -> Path:
    """Explain every image, write its overlay PNG into ``out`` and the CSV last.

    Args:
        explainer: the model's explainer.
        images: float32 ``[N, C, *spatial]`` preprocessed as in training.
        labels: each image's true class, None where unknown.
        names: each image's file name or index, as written in the CSV.
        out: the local output folder (created).
        class_idx: the class every heatmap explains; None = the predicted class.

    Returns:
        The path of ``predictions.csv`` (columns ``sample, true_label,
        predicted, explained_class, prob_<k>..., peak_<axis>..., png``;
        peak indices are voxels of the preprocessed image's grid).
    """
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for start in range(0, len(images), BATCH):
        batch = images[start:start + BATCH]
        for offset, result in enumerate(explainer.explain(batch, class_idx)):
            index = start + offset
            png = f"{_file_stem(names[index], index)}.png"
            picture = explanation_png(batch[offset].numpy(), result.heatmap, result.peak)
            save_png(picture, out / png)
            rows.append(_row(names[index], labels[index], result, png))
    path = out / CSV_NAME
    with atomic_file(path, "w") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["sample"])
        writer.writeheader()
        writer.writerows(rows)
    return path
