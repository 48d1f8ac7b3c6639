"""Score a saved model on any configured dataset.

    python -m server.score runs/pneumonia-20261123-101500
    python -m server.score runs/pneumonia-... data.path=/data/other.npz

Rebuilds the model from the run folder's ``config.yaml``, loads its
``final_model.pt`` (or ``--weights FILE``), applies ``key=value`` overrides
(typically ``data.*``), and scores it on every hospital's test split, weighted
overall, and the central test set, under the same metric names as a run.
Writes ``scores.json`` into the run folder (or ``--out FILE``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from common.compose import load_run_settings
from common.config import ConfigError
from common.models import build_model
from common.training import resolve_device
from server.baseline import score_everywhere
from server.checkpoint import FINAL_MODEL
from server.report import atomic_write_text
from server.summary_table import print_summary


def main(argv: list[str]) -> int:
    """Command line: run folder and overrides in, exit code out."""
    parser = argparse.ArgumentParser(prog="python -m server.score", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a run folder written by MedFed")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    parser.add_argument("--weights", type=Path,
                        help=f"weights file (default RUN_DIR/{FINAL_MODEL})")
    parser.add_argument("--out", type=Path,
                        help="where to write scores (default RUN_DIR/scores.json)")
    args = parser.parse_args(argv)
    try:
        settings = load_run_settings(args.run_dir / "config.yaml", args.overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    weights_path = args.weights or args.run_dir / FINAL_MODEL
    if not weights_path.is_file():
        print(f"error: {weights_path} not found", file=sys.stderr)
        return 2
    device = resolve_device(settings.train.device)
    model = build_model(settings.task, settings.model).to(device)
    model.load_state_dict(torch.load(weights_path, map_location=device, weights_only=True))
    scores = {"experiment": f"{settings.name} (scored {weights_path.name})",
              "task": settings.task.kind, "rounds": settings.federation.rounds,
              **score_everywhere(model, settings, device)}
    out = args.out or args.run_dir / "scores.json"
    atomic_write_text(out, json.dumps(scores, indent=2) + "\n")
    print_summary(scores, run_dir=args.run_dir)
    print(f"scores written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
