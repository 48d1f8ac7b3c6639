"""Apply a run's exported model to new scans, at the hospital.

    python -m client predict RUN_DIR/model scan.dcm series/ brain.nii.gz xray.png --out preds/

Inputs: DICOM files or a DICOM series folder, NIfTI volumes, PNG/JPEG
images, preprocessed as in training (the readers of :mod:`common.data`).
Classification writes ``predictions.csv`` (probability of each class, the
label at the run's chosen threshold for two classes, argmax otherwise).
Segmentation writes ``NAME_mask.nii.gz`` per volume on the input's own grid
and affine, and ``predictions.csv`` (foreground voxels; Dice against a label
given with ``--label`` or found in an MSD ``labelsTr/`` beside ``imagesTr/``).
"""

from __future__ import annotations

import argparse
import csv
import gzip
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor, PydicomReader
from monai.transforms import EnsureChannelFirst, ResampleToMatch
from monai.utils import convert_to_tensor

from common.atomic import atomic_file
from common.config import Settings
from common.data.errors import DataError
from common.data.labelled_folder import to_task
from common.data.readers import load, suffix
from common.data.resize import padded_shape, resize_image, resize_mask
from common.data.volumes import prepare_volume
from common.export import ExportedModel, ExportError, load_export
from common.logs import medfed_logger

log = medfed_logger()
VOLUMES = (".nii", ".nii.gz")


def read_input(path: Path) -> torch.Tensor:
    """A file, or a DICOM series folder (MONAI's PydicomReader), as ``[C, *spatial]``."""
    if not path.is_dir():
        return load(path)
    try:
        reader = PydicomReader(swap_ij=False)
        array, meta = reader.get_data(reader.read(str(path)))
        image = MetaTensor(np.asarray(array, dtype=np.float32), meta=meta)
        return EnsureChannelFirst()(image, meta_dict=meta)
    except Exception as err:  # noqa: BLE001 - any reader failure means an unreadable series
        raise DataError(f"cannot read DICOM series folder {path}: {err}", file=path) from None


def classify_input(exported: ExportedModel, image: torch.Tensor, path: Path) -> torch.Tensor:
    """Class probabilities ``[K]`` of one image."""
    settings = exported.settings
    if settings.data.source == "medmnist" and suffix(path) in (".png", ".jpg", ".jpeg"):
        grey = image[:3].mean(0, keepdim=True) if image.shape[0] != settings.task.in_channels \
            else image
        x = resize_image(grey, settings.task.image_size) / 255.0  # as MedMNIST's 8-bit arrays
    else:
        x = to_task(convert_to_tensor(image, track_meta=False), settings.task, path)
    with torch.no_grad():
        return torch.softmax(exported.model(x[None].float()), dim=1)[0]


def label_of(exported: ExportedModel, probs: torch.Tensor) -> tuple[int, float | None]:
    """Predicted class: P(class 1) >= the run's threshold for two classes, else argmax."""
    if probs.numel() == 2:
        threshold = 0.5 if exported.threshold is None else exported.threshold
        return int(float(probs[1]) >= threshold), threshold
    return int(probs.argmax()), None


def segment_volume(exported: ExportedModel, image: torch.Tensor) -> np.ndarray:
    """Class mask on ``image``'s own grid (``[X, Y, Z]`` uint8), via training's preprocessing.

    The volume is reoriented, resampled and scaled as in training, slices are
    padded and resized as in training, the network runs slice by slice (MONAI's
    sliding-window inference with one-slice windows), and the mask goes back:
    resized (nearest) and cropped, then resampled with nearest interpolation
    onto the input's affine and shape.
    """
    settings = exported.settings
    volume = prepare_volume({"image": image, "label": torch.zeros_like(image)},
                            Path("input"), Path("input"), settings)
    processed = _processed_grid(image, settings)
    axis, size = settings.data.slice_axis, list(settings.task.image_size)
    shape = list(volume.image.shape[1:])
    plane = [n for a, n in enumerate(shape) if a != axis]
    spacing = [p for a, p in enumerate(volume.spacing) if a != axis]
    padded = padded_shape(plane, spacing, size)
    stack = volume.image[0].movedim(axis, 0)
    pad = [(t - n) // 2 for t, n in zip(padded, plane, strict=True)]
    canvas = torch.zeros(stack.shape[0], *padded)
    canvas[:, pad[0]:pad[0] + plane[0], pad[1]:pad[1] + plane[1]] = stack
    slices = resize_image(canvas, size).unsqueeze(1)
    pred = slice_windows(exported.model, slices)
    back = resize_mask(pred, padded)[:, pad[0]:pad[0] + plane[0], pad[1]:pad[1] + plane[1]]
    mask = MetaTensor(back.movedim(0, axis)[None].float(), affine=processed)
    matched = ResampleToMatch(mode="nearest")(mask, img_dst=image)
    return np.asarray(convert_to_tensor(matched, track_meta=False)[0].round(), dtype=np.uint8)


def slice_windows(model: torch.nn.Module, slices: torch.Tensor) -> torch.Tensor:
    """A 2D network over a stack of slices ``[D, C, H, W]``, as MONAI sliding-window
    inference of the volume ``[1, C, H, W, D]`` with one-slice windows ``(H, W, 1)``.

    Returns:
        The class of every pixel, ``[D, H, W]``.
    """
    from monai.inferers import SlidingWindowInferer

    volume = slices.permute(1, 2, 3, 0)[None]  # [1, C, H, W, D]
    inferer = SlidingWindowInferer(roi_size=(*slices.shape[2:], 1), sw_batch_size=16,
                                   overlap=0.0)

    def on_slices(window: torch.Tensor) -> torch.Tensor:  # [B, C, H, W, 1]
        return model(window[..., 0])[..., None]

    with torch.no_grad():
        logits = inferer(volume, on_slices)
    assert isinstance(logits, torch.Tensor)
    return logits[0].argmax(0).permute(2, 0, 1)


def _processed_grid(image: torch.Tensor, settings: Settings) -> torch.Tensor:
    """The affine of ``image`` after training's reorientation and resampling."""
    from monai.transforms import Orientation, Spacing

    out = Orientation(axcodes="RAS", labels=None)(image)
    if settings.data.spacing:
        out = Spacing(pixdim=settings.data.spacing, mode="nearest")(out)
    return torch.as_tensor(MetaTensor(out).affine)


def dice(mask: np.ndarray, truth: np.ndarray) -> float | None:
    """Foreground Dice of two masks of one grid (None when both are empty)."""
    a, b = mask > 0, truth > 0
    total = int(a.sum() + b.sum())
    return None if total == 0 else 2.0 * int((a & b).sum()) / total


def label_for(path: Path, given: dict[Path, Path]) -> Path | None:
    """The label file of ``path``: ``--label``, or MSD's ``labelsTr/`` twin."""
    if path in given:
        return given[path]
    if path.parent.name == "imagesTr":
        twin = path.parent.parent / "labelsTr" / path.name
        return twin if twin.is_file() else None
    return None


def _name(path: Path) -> str:
    return path.name[: -len(suffix(path))] if suffix(path) else path.name


def predict_one(exported: ExportedModel, path: Path, label: Path | None, out: Path
                ) -> dict[str, object]:
    """One CSV row for ``path`` (and its mask file, for segmentation)."""
    image = read_input(path)
    if exported.settings.task.kind == "classification":
        probs = classify_input(exported, image, path)
        predicted, threshold = label_of(exported, probs)
        names = exported.metadata.get("class_names") or []
        row: dict[str, object] = {"file": str(path)}
        row.update({f"p_{n}": round(float(p), 6) for n, p in zip(names, probs, strict=False)})
        return {**row, "label": predicted, "threshold": threshold}
    if suffix(path) not in VOLUMES:
        raise DataError(f"{path}: segmentation takes NIfTI volumes (.nii, .nii.gz)", file=path)
    mask = segment_volume(exported, image)
    affine = np.asarray(MetaTensor(image).affine)
    target = out / f"{_name(path)}_mask.nii.gz"
    with atomic_file(target) as handle:
        handle.write(gzip.compress(nib.Nifti1Image(mask, affine).to_bytes()))
    row = {"file": str(path), "mask": str(target), "foreground_voxels": int((mask > 0).sum())}
    if label is not None:
        truth = np.asarray(convert_to_tensor(load(label), track_meta=False)[0])
        if truth.shape != mask.shape:
            raise DataError(f"label {label} has shape {truth.shape}, its image {path} "
                            f"{mask.shape}", file=label)
        row.update({"label_file": str(label), "dice": dice(mask, truth)})
    return row


def parse(argv: list[str]) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(prog="python -m client predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path, help="an exported model (RUN_DIR/model) or its run folder")
    p.add_argument("inputs", type=Path, nargs="+", help="DICOM file or series folder, NIfTI, "
                   "PNG or JPEG")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--label", type=Path, action="append", default=[],
                   help="segmentation: the label of the input at the same position (repeat)")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    """Predict on every input; exit code 2 on an unreadable input or a model that does not fit."""
    args = parse(argv)
    try:
        exported = load_export(args.model)
    except ExportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    given = dict(zip(args.inputs, args.label, strict=False))
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, path in enumerate(args.inputs, start=1):
        try:
            rows.append(predict_one(exported, path, label_for(path, given), args.out))
        except (DataError, RuntimeError, ValueError) as err:
            print(f"error: {path}: {str(err).splitlines()[0]}", file=sys.stderr)
            return 2
        log.info("[MedFed] predict %d/%d %s: %s", index, len(args.inputs), path,
                 {k: v for k, v in rows[-1].items() if k not in ("file", "mask")})
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with atomic_file(args.out / "predictions.csv", "w") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.out / 'predictions.csv'} ({len(rows)} inputs)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
