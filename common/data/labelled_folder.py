"""Classification from a folder of images and a labels CSV (``image,label``)."""

from __future__ import annotations

import csv
from pathlib import Path

import torch

from common.config import TaskConfig
from common.data.errors import (
    INCOMPATIBLE,
    LAYOUT,
    MISSING_FILE,
    MISSING_LABEL,
    NOT_INTEGER,
    OUT_OF_RANGE,
    DataError,
)
from common.data.readers import check_extension, is_image, read_image
from common.data.resize import resize_image

Row = tuple[int, str, str]
"""One labels.csv row: ``(line, image cell, label cell)``, cells stripped; the header is line 1."""


def csv_rows(folder: Path, csv_name: str) -> tuple[Path, list[Row]]:
    """The labels CSV of ``folder`` and its rows.

    Raises:
        DataError: missing folder or CSV, or missing columns.
    """
    if not folder.is_dir():
        raise DataError(f"data folder {folder} not found", kind=LAYOUT, file=folder)
    csv_path = folder / csv_name
    if not csv_path.is_file():
        raise DataError(f"labels file {csv_path} not found (data.labels_csv={csv_name!r})",
                        kind=LAYOUT, file=csv_path)
    with open(csv_path, newline="") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or not {"image", "label"} <= set(reader.fieldnames):
            raise DataError(f"{csv_path} needs the columns 'image' and 'label', "
                            f"found {reader.fieldnames}", kind=LAYOUT, file=csv_path)
        return csv_path, [(line, (row.get("image") or "").strip(),
                           (row.get("label") or "").strip())
                          for line, row in enumerate(reader, start=2)]


def parse_row(folder: Path, csv_path: Path, row: Row) -> tuple[Path, int]:
    """``(image path, class)`` of one CSV row.

    Raises:
        DataError: an empty or non-integer label, an unknown extension, or a
            listed image that does not exist (the file and line named).
    """
    line, image, label = row
    path = folder / image
    if not label:
        raise DataError(f"{csv_path} line {line}: image {image!r} has no label",
                        kind=MISSING_LABEL, file=path, row=line)
    try:
        target = int(label)
    except ValueError:
        raise DataError(f"{csv_path} line {line}: label {label!r} of {image!r} is not an "
                        "integer class", kind=NOT_INTEGER, file=path, row=line) from None
    check_extension(path)
    if not path.is_file():
        raise DataError(f"{path} is listed in {csv_path} but does not exist",
                        kind=MISSING_FILE, file=path, row=line)
    return path, target


def unlisted(folder: Path, csv_path: Path, listed: set[Path]) -> list[DataError]:
    """An error for every image file in ``folder`` whose resolved path is not in ``listed``."""
    return [DataError(f"{path} has no label: it is missing from {csv_path}",
                      kind=MISSING_LABEL, file=path)
            for path in sorted(folder.rglob("*"))
            if path.is_file() and is_image(path) and path.resolve() not in listed]


def read_labels(folder: Path, csv_name: str) -> list[tuple[Path, int]]:
    """``(image path, class)`` for every CSV row, checked against the folder.

    Raises:
        DataError: missing folder or CSV, missing columns, an empty or
            non-integer label, a listed file with an unknown extension, a listed
            image that does not exist, or an image
            in the folder that the CSV does not list (the first found, named).
    """
    csv_path, raw = csv_rows(folder, csv_name)
    rows = [parse_row(folder, csv_path, row) for row in raw]
    for error in unlisted(folder, csv_path, {path.resolve() for path, _ in rows}):
        raise error
    if not rows:
        raise DataError(f"{csv_path} lists no images", kind=LAYOUT, file=csv_path)
    return rows


def to_task(image: torch.Tensor, task: TaskConfig, path: Path) -> torch.Tensor:
    """Fit one image ``[C, *spatial]`` to the task: ``[in_channels, *image_size]`` in [0, 1].

    A 3D file in a 2D task gives its middle slice along the last axis; colour
    images become grey when ``task.in_channels`` is 1; intensities are
    min-max scaled per image (DICOM/NIfTI values are in scanner units).
    """
    if image.ndim - 1 == 3 and task.spatial_dims == 2:
        image = image[..., image.shape[-1] // 2]  # a 3D file in a 2D task: its middle slice
    if image.ndim - 1 != task.spatial_dims:
        raise DataError(f"{path} has {image.ndim - 1} spatial dims; task.spatial_dims="
                        f"{task.spatial_dims}", kind=INCOMPATIBLE, file=path)
    if image.shape[0] != task.in_channels:
        if task.in_channels == 1 and image.shape[0] in (3, 4):
            image = image[:3].mean(0, keepdim=True)  # colour to grey
        else:
            raise DataError(f"{path} has {image.shape[0]} channels; task.in_channels="
                            f"{task.in_channels}", kind=INCOMPATIBLE, file=path)
    image = resize_image(image, task.image_size)
    low, high = image.min(), image.max()
    return (image - low) / (high - low) if high > low else image - low


def load_labelled(rows: list[tuple[Path, int]], task: TaskConfig
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Read the listed images: ``[N, C, *image_size]`` and labels ``[N]``.

    Raises:
        DataError: an unreadable image or a label outside ``task.num_classes``.
    """
    images, labels = [], []
    for path, label in rows:
        if not 0 <= label < task.num_classes:
            raise DataError(f"{path}: label {label} outside [0, task.num_classes="
                            f"{task.num_classes})", kind=OUT_OF_RANGE, file=path)
        images.append(to_task(read_image(path), task, path))
        labels.append(label)
    return torch.stack(images), torch.tensor(labels, dtype=torch.long)
