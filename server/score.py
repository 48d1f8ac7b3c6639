"""Score a saved model on any test set, or again on the run's own data.

    python -m server.score runs/pneumonia-20261123-101500 --data /data/test-only.npz
    python -m server.score runs/pneumonia-... --data /data/xrays        # images + labels.csv
    python -m server.score runs/brain_mri-... --data /data/msd-folder   # imagesTr/ or imagesTs/
    python -m server.score runs/pneumonia-... data=folder data.path=/data/xrays
    python -m server.score runs/pneumonia-...                           # the run's own splits

Rebuilds the model from the run folder's ``config.yaml`` and loads its
``best_model.pt`` (the validation-selected model; else ``final_model.pt``, or
``--weights FILE``). With ``--data PATH`` (a ``.npz`` is read as MedMNIST,
a folder as images + labels CSV or an MSD folder), or with data overrides
(``data=NAME``, ``data.source=...``, ``data.path=...``), every sample of that
test set is scored: no split, no hospitals (a MedMNIST file's test split is
the whole of a test-only file). Without them, each hospital's test split,
weighted overall and the central test set are scored as at the end of the run.
Two-class models predict at the run's chosen threshold (``summary.json``).
Writes ``scores.json`` into the run folder (or ``--out FILE``): what was
scored (path, samples, per-class counts) and the metrics, undefined ones null.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from common.compose import load_run_settings
from common.config import ConfigError, Settings
from common.data import DataError
from common.data.test_set import load_test_set
from common.evaluation import evaluate
from common.intervals import Bootstrap
from common.models import build_model
from common.training import resolve_device
from server.baseline import score_everywhere
from server.checkpoint import FINAL_MODEL
from server.report import SUMMARY_FILE, atomic_write_text
from server.score_overrides import data_overrides, is_test_set
from server.selection import BEST_MODEL
from server.summary_table import print_summary


def parse(argv: list[str]) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(prog="python -m server.score", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a run folder written by MedFed")
    parser.add_argument("overrides", nargs="*",
                        help="key=value config overrides (data=NAME replaces the data group)")
    parser.add_argument("--data", type=Path, help="a test set: a MedMNIST .npz, a folder of "
                        "images with labels.csv, or an MSD folder; every sample is scored")
    parser.add_argument("--weights", type=Path,
                        help=f"weights file (default RUN_DIR/{BEST_MODEL}, else {FINAL_MODEL})")
    parser.add_argument("--out", type=Path,
                        help="where to write scores (default RUN_DIR/scores.json)")
    return parser.parse_args(argv)


def defined(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None (undefined), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: defined(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [defined(v) for v in value]
    return value


def run_threshold(run_dir: Path) -> float | None:
    """The decision threshold the run chose (``summary.json["threshold"]["value"]``), if any."""
    path = run_dir / SUMMARY_FILE
    if not path.is_file():
        return None
    threshold = json.loads(path.read_text()).get("threshold")
    return float(threshold["value"]) if isinstance(threshold, dict) and threshold.get(
        "value") is not None else None


def score_test_set(model: torch.nn.Module, settings: Settings, device: torch.device,
                   threshold: float | None) -> dict[str, Any]:
    """``{"scored": what, "test_set": metrics}`` for every sample of ``data.path``."""
    test_set = load_test_set(settings)
    ev = settings.evaluation
    metrics = evaluate(model, DataLoader(test_set.dataset, batch_size=max(64,
                                                                          settings.data.batch_size)),
                       task=settings.task, device=device, threshold=threshold,
                       boot=Bootstrap(ev.bootstrap, ev.confidence, settings.seed))
    return {"scored": test_set.describe(), "test_set": metrics}


def _weights(args: argparse.Namespace) -> Path:
    if args.weights:
        return Path(args.weights)
    best = args.run_dir / BEST_MODEL
    return best if best.is_file() else args.run_dir / FINAL_MODEL


def main(argv: list[str]) -> int:
    """Command line: run folder, test set and overrides in, exit code out."""
    args = parse(argv)
    try:
        overrides = data_overrides(args.overrides, args.data)
        settings = load_run_settings(args.run_dir / "config.yaml", overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    weights_path = _weights(args)
    if not weights_path.is_file():
        print(f"error: {weights_path} not found", file=sys.stderr)
        return 2
    device = resolve_device(settings.train.device)
    model = build_model(settings.task, settings.model).to(device)
    model.load_state_dict(torch.load(weights_path, map_location=device, weights_only=True))
    threshold = run_threshold(args.run_dir) if settings.task.num_classes == 2 else None
    try:
        if is_test_set(args.overrides, args.data):
            figures = score_test_set(model, settings, device, threshold)
        else:
            figures = {"scored": {"path": "the run's hospital test splits and central test set"},
                       **score_everywhere(model, settings, device)}
    except DataError as err:
        print(f"data error: {err}", file=sys.stderr)
        return 2
    scores = defined({"experiment": f"{settings.name} (scored {weights_path.name})",
                      "task": settings.task.kind, "weights": str(weights_path),
                      "threshold": threshold, **figures})
    out = args.out or args.run_dir / "scores.json"
    atomic_write_text(out, json.dumps(scores, indent=2, allow_nan=False) + "\n")
    print_summary(scores, run_dir=args.run_dir)
    print(f"scores written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
