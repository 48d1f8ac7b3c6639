"""Check a hospital's data folder before anything starts: every problem at once.

Every file is read once with the readers training uses (:mod:`common.data.readers`,
:mod:`common.data.labelled_folder`, :mod:`common.data.volumes`), every failure is
kept (not only the first), and the readable samples are divided into the
hospital's splits as :mod:`common.data.site` divides them, for counts per class
and per split. Errors (the run would fail on them) and warnings (the figures
would mean little: a class absent, a test split too small) are told apart.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np
import torch

from common.config import Settings
from common.data.errors import CLASS_ABSENT, LAYOUT, OUT_OF_RANGE, SPLIT_TOO_SMALL, DataError
from common.data.labelled_folder import csv_rows, parse_row, to_task, unlisted
from common.data.readers import load, read_image, suffix
from common.data.site import SiteData, split_labelled, split_samples
from common.data.volumes import (
    VolumeSamples,
    check_volume_task,
    mask_of,
    prepare_volume,
    volume_samples,
)

MIN_TEST = 10
"""The fewest test samples whose metrics mean anything (fewer is a warning)."""
ANY_CLASSES = 256
"""Classes allowed while reading when the task's number of classes is not known."""


@dataclass(frozen=True)
class Problem:
    """One problem: its kind (:mod:`common.data.errors`), message, file, and severity."""

    kind: str
    message: str
    file: Path | None = None
    warning: bool = False


@dataclass
class Report:
    """What a check found: problems, samples, per class and per split, time taken (s).

    Per class: samples of the class (classification), samples whose mask holds
    it (segmentation).
    """

    folder: Path
    problems: list[Problem] = field(default_factory=list)
    samples: int = 0
    class_counts: list[int] = field(default_factory=list)
    split_counts: dict[str, list[int]] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def errors(self) -> list[Problem]:
        """The problems a run would fail on."""
        return [p for p in self.problems if not p.warning]

    def add(self, err: DataError, *, warning: bool = False) -> None:
        """Record ``err`` as a problem."""
        self.problems.append(Problem(err.kind, str(err), err.file, warning))

    def lines(self) -> list[str]:
        """The report as text lines: counts, then one line per problem."""
        lines = [f"{self.folder}: {self.samples} samples, per class "
                 f"{self.class_counts}; checked in {self.seconds:.1f} s"]
        lines += [f"  {split}: per class {counts}" for split, counts in self.split_counts.items()]
        lines += [f"  {'WARNING' if p.warning else 'ERROR'} [{p.kind}] {p.message}"
                  for p in self.problems]
        return lines


def _classification(folder: Path, settings: Settings, report: Report
                    ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Every readable image and its class; every problem into ``report``."""
    try:
        csv_path, raw = csv_rows(folder, settings.data.labels_csv)
    except DataError as err:
        report.add(err)
        return None
    images, labels, listed = [], [], set()
    for row in raw:
        try:
            path, label = parse_row(folder, csv_path, row)
            listed.add(path.resolve())
            if not 0 <= label < settings.task.num_classes:
                raise DataError(f"{path}: label {label} outside [0, task.num_classes="
                                f"{settings.task.num_classes})", kind=OUT_OF_RANGE, file=path)
            images.append(to_task(read_image(path), settings.task, path))
            labels.append(label)
        except DataError as err:
            listed.add((folder / row[1]).resolve())
            report.add(err)
    for missing in unlisted(folder, csv_path, listed):
        report.add(missing)
    if not images:
        report.add(DataError(f"{csv_path}: no readable labelled image", kind=LAYOUT,
                             file=csv_path))
        return None
    return torch.stack(images), torch.tensor(labels, dtype=torch.long)


def _segmentation(folder: Path, settings: Settings, report: Report) -> VolumeSamples | None:
    """Every readable volume's samples; every problem into ``report``."""
    images_dir, labels_dir = folder / "imagesTr", folder / "labelsTr"
    try:
        check_volume_task(folder, settings)
        for sub in (images_dir, labels_dir):
            if not sub.is_dir():
                raise DataError(f"{folder} lacks {sub.name}/ (expected imagesTr/ and labelsTr/)",
                                kind=LAYOUT, file=sub)
    except DataError as err:
        report.add(err)
        return None
    xs, ys, ids = [], [], list[np.ndarray]()
    for image in sorted(p for p in images_dir.iterdir() if not p.name.startswith(".")):
        if suffix(image) not in (".nii", ".nii.gz"):
            continue
        try:
            mask = mask_of(image, labels_dir)
            loaded = {"image": load(image), "label": load(mask)}
            x, y = volume_samples(prepare_volume(loaded, image, mask, settings), settings)
        except DataError as err:
            report.add(err)
            continue
        xs.append(x)
        ys.append(y)
        ids.append(np.full(len(x), len(ids)))
    if not xs or sum(len(x) for x in xs) == 0:
        report.add(DataError(f"{images_dir}: no readable volume with samples", kind=LAYOUT,
                             file=images_dir))
        return None
    return VolumeSamples(torch.cat(xs), torch.cat(ys), np.concatenate(ids))


def _counts(targets: torch.Tensor, classes: int, segmentation: bool) -> list[int]:
    if segmentation:
        flat = targets.flatten(1)
        return [int((flat == k).any(1).sum()) for k in range(classes)]
    return [int((targets == k).sum()) for k in range(classes)]


def _judge(report: Report, site: SiteData, classes: int, segmentation: bool,
           settings: Settings) -> None:
    """Counts per split, and warnings for absent classes and a small test split."""
    for split in ("train", "val", "test"):
        data = getattr(site, split)
        targets = data.tensors[1] if len(data) else torch.zeros(0, dtype=torch.long)
        report.split_counts[split] = _counts(targets, classes, segmentation)
    test_size = len(cast(Sized, site.test))
    for k, count in enumerate(report.class_counts):
        if count == 0:
            report.add(DataError(f"{report.folder}: class {k} has no sample", kind=CLASS_ABSENT),
                       warning=True)
    test = report.split_counts["test"]
    if settings.data.test_fraction > 0 and test_size < MIN_TEST:
        report.add(DataError(f"{report.folder}: the test split holds {test_size} samples "
                             f"(< {MIN_TEST}); its metrics would mean little",
                             kind=SPLIT_TOO_SMALL), warning=True)
    absent = [k for k, c in enumerate(test) if c == 0 and report.class_counts[k] > 0]
    if absent and test_size:
        report.add(DataError(f"{report.folder}: class(es) {absent} absent from the test split "
                             "(AUC, sensitivity or specificity undefined there)",
                             kind=CLASS_ABSENT), warning=True)


def check_folder(folder: Path, settings: Settings, *, hospital: int = 0,
                 known_classes: bool = True) -> Report:
    """Check one hospital's folder as ``settings`` would read and split it.

    Args:
        folder: images + labels CSV (classification) or imagesTr/labelsTr (segmentation).
        settings: the task, reading and split settings.
        hospital: the hospital's index (seed of its split).
        known_classes: False where ``task.num_classes`` is a guess (a node
            before any run): labels are not range-checked and classes count
            up to the largest seen.
    """
    started = time.perf_counter()
    report = Report(folder)
    if not known_classes:
        settings = copy.deepcopy(settings)
        settings.task.num_classes = ANY_CLASSES
    segmentation = settings.task.kind == "segmentation"
    found = (_segmentation if segmentation else _classification)(folder, settings, report)
    if found is not None:
        targets = found.masks if isinstance(found, VolumeSamples) else found[1]
        classes = (settings.task.num_classes if known_classes
                   else max(2, int(targets.max()) + 1))
        report.class_counts = _counts(targets, classes, segmentation)
        report.samples = len(targets)
        try:
            site = (split_samples(folder.name, found, settings, hospital)
                    if isinstance(found, VolumeSamples)
                    else split_labelled(folder.name, *found, settings, hospital))
            _judge(report, site, classes, segmentation, settings)
        except DataError as err:
            report.add(err)
    report.seconds = time.perf_counter() - started
    return report
