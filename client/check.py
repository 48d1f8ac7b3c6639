"""Check a hospital's data folder before any run: every problem at once, in seconds.

    python -m client check --data-path /data/site-a
    python -m client check --data-path /data/site-a --config experiment=brain_mri

Reads every file once with the readers training uses and lists every
problem (unreadable file, missing or non-integer label, mask/image shape
mismatch, a class absent, a test split too small for its metrics to mean
anything) with counts per class and per split. ``--config`` takes the
experiment's overrides (task, classes, image size, split fractions); without
one the task follows the folder (imagesTr/ = segmentation) and labels are
not range-checked. Exit code 0 when clean, 2 with the list otherwise.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from common.compose import compose_settings
from common.config import ConfigError, Settings
from common.data.check import Report, check_folder


def folder_settings(folder: Path, overrides: Sequence[str]) -> tuple[Settings, bool]:
    """Settings to check ``folder`` with, and whether they name the task's classes.

    Raises:
        ConfigError: a bad override.
    """
    names_task = any(o.startswith(("task", "experiment=")) for o in overrides)
    extra = []
    if (folder / "imagesTr").is_dir():  # the model does not matter to a check, the task does
        extra = [] if names_task else ["task=segmentation"]
        if not any(o.startswith(("model=", "experiment=")) for o in overrides):
            extra.append("model=unet")
    return compose_settings([*extra, *overrides]), names_task


def check(folder: Path, overrides: Sequence[str] = ()) -> Report:
    """The report on ``folder`` (see the module docstring)."""
    settings, known = folder_settings(folder, overrides)
    return check_folder(folder, settings, known_classes=known)


def main(argv: list[str]) -> int:
    """Command line: folder and overrides in, 0 (clean) or 2 (problems) out."""
    parser = argparse.ArgumentParser(prog="python -m client check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-path", type=Path, required=True, help="the hospital's folder")
    parser.add_argument("--config", nargs="*", default=[], help="experiment overrides")
    args = parser.parse_args(argv)
    try:
        report = check(args.data_path, args.config)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    print("\n".join(report.lines()))
    if report.problems:
        print(f"{len(report.problems)} problem(s) found", file=sys.stderr)
        return 2
    print("no problem found")
    return 0
