"""A run's self-describing exported model, in a MONAI-bundle-like layout.

    RUN_DIR/model/models/model.pt         state dict of the selected model (torch.save)
    RUN_DIR/model/configs/metadata.json   format, task, model, preprocessing, threshold, ...
    RUN_DIR/model/configs/settings.json   the full validated settings (settings_to_json)

Everything prediction needs is in the folder, so ``python -m client predict``
takes no config file. The folder is staged beside its final place and renamed
into it, so a reader never sees half an export.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import torch

from common.atomic import atomic_file
from common.config import ConfigError, Settings, settings_from_json, settings_to_json
from common.models import ModelError, build_model

FORMAT = "medfed-model/1"
EXPORT_DIR = "model"
WEIGHTS_FILE = Path("models") / "model.pt"
METADATA_FILE = Path("configs") / "metadata.json"
SETTINGS_FILE = Path("configs") / "settings.json"
VOLUME_INTENSITY = "per-volume percentiles 0.5-99.5 scaled to [0, 1], clipped"
IMAGE_INTENSITY = {"medmnist": "8-bit values / 255 (MedMNIST arrays); other files min-max "
                               "scaled per image to [0, 1]",
                   "folder": "min-max scaled per image to [0, 1]",
                   "synthetic": "generated in [0, 1]"}


class ExportError(ValueError):
    """An exported model is missing a file, or its files do not match; names the file."""


@dataclass
class ExportedModel:
    """A loaded export.

    Attributes:
        settings: the run's validated settings.
        model: the network with the exported weights, in eval mode on the CPU.
        threshold: the two-class decision threshold on P(class 1) chosen by
            the run, or None (more classes, segmentation, or none chosen).
        path: the export's ``model/`` folder.
        metadata: ``configs/metadata.json`` as read.
    """

    settings: Settings
    model: torch.nn.Module
    threshold: float | None
    path: Path
    metadata: dict[str, Any]


def _version() -> str:
    try:
        return importlib_metadata.version("medfed")
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


def preprocessing(settings: Settings) -> dict[str, Any]:
    """What turns a file into the network's input, as training did it."""
    data, task = settings.data, settings.task
    volumes = data.source == "folder" and task.kind == "segmentation"
    return {
        "source": data.source,
        "image_size": list(task.image_size),
        "in_channels": task.in_channels,
        "spatial_dims": task.spatial_dims,
        "volume_mode": data.volume_mode,
        "slice_axis": data.slice_axis,
        "orientation": "RAS" if volumes else None,
        "spacing": list(data.spacing) if data.spacing else None,
        "intensity": VOLUME_INTENSITY if volumes else IMAGE_INTENSITY[data.source],
        "aspect": "zero-padded to image_size's aspect ratio in mm, then resized"
                  if volumes else "resized to image_size",
    }


def metadata(settings: Settings, threshold: dict | None, weights_from: str,
             class_names: list[str] | None = None) -> dict[str, Any]:
    """The contents of ``configs/metadata.json``."""
    task = settings.task
    names = class_names or ([f"class-{i}" for i in range(task.num_classes)])
    return {
        "format": FORMAT,
        "task": {"kind": task.kind, "spatial_dims": task.spatial_dims,
                 "in_channels": task.in_channels, "num_classes": task.num_classes,
                 "image_size": list(task.image_size)},
        "model": {"name": settings.model.name, "channels": list(settings.model.channels),
                  "dropout": settings.model.dropout},
        "preprocessing": preprocessing(settings),
        "threshold": threshold,
        "class_names": names,
        "weights_from": weights_from,
        "experiment": settings.name,
        "medfed_version": _version(),
    }


def export_model(run_dir: Path, settings: Settings, weights: Mapping[str, torch.Tensor], *,
                 threshold: dict | None, weights_from: str) -> Path:
    """Write ``run_dir/model/`` (see the module docstring), replacing an earlier export whole.

    Args:
        run_dir: the run folder.
        settings: the run's settings.
        weights: the selected model's state dict.
        threshold: ``summary["threshold"]`` (``{"value", "method", "chosen_on"}``) or None.
        weights_from: the file the weights came from (``best_model.pt``, ``final_model.pt``).

    Returns:
        The ``model/`` folder.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / EXPORT_DIR
    stage = Path(tempfile.mkdtemp(dir=run_dir, prefix=f".{EXPORT_DIR}."))
    try:
        (stage / "models").mkdir()
        (stage / "configs").mkdir()
        cpu = {k: v.detach().cpu() for k, v in weights.items()}
        with atomic_file(stage / WEIGHTS_FILE) as handle:
            torch.save(cpu, handle)
        meta = metadata(settings, threshold, weights_from)
        (stage / METADATA_FILE).write_text(json.dumps(meta, indent=2))
        (stage / SETTINGS_FILE).write_text(settings_to_json(settings))
        old = run_dir / f".{EXPORT_DIR}.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.replace(final, old)
        os.replace(stage, final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return final


def export_folder(path: Path) -> Path:
    """The ``model/`` folder of ``path`` (that folder itself, or a run folder holding it).

    Raises:
        ExportError: neither.
    """
    for folder in (path, path / EXPORT_DIR):
        if (folder / METADATA_FILE).is_file() or (folder / WEIGHTS_FILE).is_file():
            return folder
    raise ExportError(f"{path} is not an exported MedFed model: neither {path / METADATA_FILE} "
                      f"nor {path / EXPORT_DIR / METADATA_FILE} exists")


def _read_json(file: Path) -> Any:
    if not file.is_file():
        raise ExportError(f"exported model is incomplete: {file} not found")
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise ExportError(f"cannot read {file}: {err}") from None


def _threshold(meta: dict[str, Any], file: Path) -> float | None:
    value = meta.get("threshold")
    if value is None:
        return None
    if isinstance(value, dict) and isinstance(value.get("value"), int | float):
        return float(value["value"])
    raise ExportError(f"{file}: 'threshold' must be null or {{'value': number, ...}}, "
                      f"found {value!r}")


def load_export(path: Path) -> ExportedModel:
    """Load an export written by :func:`export_model`.

    Args:
        path: the ``model/`` folder, or a run folder that holds it.

    Raises:
        ExportError: a missing or unreadable file, an unknown format, or
            weights that do not fit the network the settings describe (the
            file named).
    """
    folder = export_folder(path)
    meta_file = folder / METADATA_FILE
    meta = _read_json(meta_file)
    found = meta.get("format") if isinstance(meta, dict) else None
    if found != FORMAT:
        raise ExportError(f"{meta_file}: format {found!r} is not {FORMAT!r}")
    settings_file = folder / SETTINGS_FILE
    try:
        settings = settings_from_json(json.dumps(_read_json(settings_file)))
    except ConfigError as err:
        raise ExportError(f"{settings_file}: {err}") from None
    model = _load_weights(folder / WEIGHTS_FILE, settings)
    return ExportedModel(settings, model, _threshold(meta, meta_file), folder, meta)


def _load_weights(file: Path, settings: Settings) -> torch.nn.Module:
    """The configured network with ``file``'s weights, eval mode, CPU."""
    if not file.is_file():
        raise ExportError(f"exported model is incomplete: {file} not found")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a bad file
        raise ExportError(f"cannot read weights {file}: {err}") from None
    try:
        model = build_model(settings.task, settings.model)
        model.load_state_dict(state)
    except (ModelError, RuntimeError, TypeError, AttributeError) as err:
        first = str(err).strip().splitlines()[0][:300]
        raise ExportError(f"weights {file} do not match the model its settings describe "
                          f"({settings.model.name}): {first}") from None
    return model.eval()


def export_run(run_dir: Path, settings: Settings, final_weights: Mapping[str, torch.Tensor],
               threshold: dict | None, best_file: str = "best_model.pt") -> Path | None:
    """Export a finished run: ``best_file`` if the run wrote one, else ``final_weights``.

    A failure is logged as an error (nothing else of the run is lost); returns
    the ``model/`` folder, or None when the export failed.
    """
    from common.logs import medfed_logger

    log = medfed_logger()
    try:
        best = run_dir / best_file
        if best.is_file():
            weights, source = torch.load(best, map_location="cpu", weights_only=True), best_file
        else:
            weights, source = final_weights, "final_model.pt"
        folder = export_model(run_dir, settings, weights, threshold=threshold,
                              weights_from=source)
    except Exception as err:  # noqa: BLE001 - reported, the run itself is complete
        log.error("[MedFed] exporting the model to %s failed: %s: %s", run_dir / EXPORT_DIR,
                  type(err).__name__, err)
        return None
    log.info("[MedFed] exported model (%s): %s", source, folder)
    return folder
