"""Every image of one source as a test set: no split, no hospitals.

A test set is a MedMNIST ``.npz`` (its ``test_images`` / ``test_labels``,
which is all a test-only file holds), a folder of images with a labels CSV
(every listed image), or an MSD folder (every slice / patch of every volume in
``imagesTr/``+``labelsTr/``, or ``imagesTs/``+``labelsTs/`` when that is what it has).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from common.config import Settings
from common.data import medmnist
from common.data.errors import LAYOUT, DataError
from common.data.labelled_folder import load_labelled, read_labels
from common.data.volumes import load_samples


@dataclass(frozen=True)
class TestSet:
    """What was read, and the samples.

    Attributes:
        source: ``medmnist``, ``folder`` (images + labels CSV) or ``msd``.
        path: the file or folder.
        dataset: ``(image, target)`` samples, every one of the source.
        class_counts: samples per class (classification) or samples whose
            mask holds the class (segmentation), index = class.
    """

    source: str
    path: Path
    dataset: TensorDataset
    class_counts: list[int]

    def describe(self) -> dict[str, object]:
        """``{"path", "source", "num-examples", "class-counts"}`` for scores.json."""
        return {"path": str(self.path), "source": self.source,
                "num-examples": len(self.dataset), "class-counts": self.class_counts}


def msd_subset(folder: Path) -> str | None:
    """``Tr`` or ``Ts``: the MSD image/label pair of sub-folders ``folder`` holds, if any."""
    for subset in ("Tr", "Ts"):
        if (folder / f"images{subset}").is_dir() and (folder / f"labels{subset}").is_dir():
            return subset
    return None


def _counts(targets: torch.Tensor, num_classes: int, segmentation: bool) -> list[int]:
    if segmentation:
        flat = targets.flatten(1)
        return [int((flat == k).any(1).sum()) for k in range(num_classes)]
    return [int((targets == k).sum()) for k in range(num_classes)]


def load_test_set(settings: Settings) -> TestSet:
    """Every sample of ``data.path``, read as ``data.source`` says (see the module docstring).

    Raises:
        DataError: missing or bad input (the file named), or a source with no test set
            (synthetic).
    """
    path, task = Path(str(settings.data.path)), settings.task
    if settings.data.source == "medmnist":
        x, y = medmnist.load_split(path, "test", task)
        source = "medmnist"
    elif settings.data.source == "folder" and task.kind == "classification":
        x, y = load_labelled(read_labels(path, settings.data.labels_csv), task)
        source = "folder"
    elif settings.data.source == "folder":
        subset = msd_subset(path)
        if subset is None:
            raise DataError(f"{path} holds neither imagesTr/+labelsTr/ nor imagesTs/+labelsTs/",
                            kind=LAYOUT, file=path)
        samples = load_samples(path, settings, subset=subset)
        x, y, source = samples.images, samples.masks, "msd"
    else:
        raise DataError("data.source=synthetic has no test set to score; pass a file or folder")
    segmentation = task.kind == "segmentation"
    return TestSet(source, path, TensorDataset(x, y), _counts(y, task.num_classes, segmentation))
