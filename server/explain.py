"""``python -m server.explain RUN_DIR [--out DIR]``: Grad-CAM over the central test set.

Only the central test set the coordinator owns (``common.data.load_central_test``:
a MedMNIST file's test split, or synthetic images) is explained; hospitals'
images never reach the coordinator. Writes PNG overlays and
``predictions.csv`` into ``--out`` (default ``RUN_DIR/explain``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from common.data import DataError, load_central_test
from common.explain import METHODS, Explainer, ExplainError
from common.explain_output import write_explanations


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m server.explain", description=__doc__)
    p.add_argument("run_dir", type=Path, help="a finished run folder (with model/)")
    p.add_argument("--out", type=Path, help="output folder (default RUN_DIR/explain)")
    p.add_argument("--method", choices=tuple(METHODS), default="gradcam")
    p.add_argument("--limit", type=int, default=32, help="explain at most N images")
    p.add_argument("--class", dest="class_idx", type=int,
                   help="explain class K (default: each image's predicted class)")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    """Explain the central test set with the run's exported model; the exit code."""
    args = parse(argv)
    from common.export import ExportError, load_export

    try:
        exported = load_export(args.run_dir)
        if exported.settings.task.kind != "classification":
            raise DataError("server.explain needs a classification run")
        central = load_central_test(exported.settings)
        if central is None or len(central) == 0:  # type: ignore[arg-type]
            raise DataError(f"{args.run_dir}: data.source={exported.settings.data.source} has "
                            "no central test set (a hospital's images stay at the hospital)")
        count = min(len(central), args.limit)  # type: ignore[arg-type]
        images = torch.stack([central[i][0] for i in range(count)])
        labels: list[int | None] = [int(central[i][1]) for i in range(count)]
        explainer = Explainer(exported.model, method=args.method,
                              model_name=exported.settings.model.name)
        out = args.out or args.run_dir / "explain"
        csv_path = write_explanations(explainer, images, labels,
                                      [f"central:{i}" for i in range(count)], out,
                                      class_idx=args.class_idx)
    except (ExportError, DataError, ExplainError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"explained {count} central test image(s): {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
