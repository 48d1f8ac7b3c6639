"""Leave-one-hospital-out: how a model does at a hospital that took no part in training.

    .venv/bin/python bench/generalization.py                       # pneumonia and brain_mri
    .venv/bin/python bench/generalization.py --presets pneumonia --held-out 1 --out loho.json
    .venv/bin/python bench/generalization.py --override federation.rounds=1 \\
        --override federation.local_epochs=1                       # smoke check only

For each preset and each held-out hospital h (``--held-out``, default every
one), with the preset's own settings and its data divided exactly as in a
run with every hospital (``data.hospitals`` lists the others, so their
splits are unchanged and none of h's images is in any of them), it trains

- **federated**: a simulation of the other hospitals (``simulate.py``);
- **local-only**: each other hospital alone, centralized on its own split
  (``server.baseline`` with ``data.hospitals=[k]``);
- **pooled**: the other hospitals' training splits pooled, centralized
  (``server.baseline``),

each with the preset's model, optimizer and epoch budget (rounds x local
epochs), and scores every model on **all** of h's images (its train, val and
test splits: h took no part), AUC for classification, Dice for
segmentation. A run folder holding ``best_model.pt`` (validation-selected)
is scored by that model, otherwise by ``final_model.pt``. With fewer
hospitals taking part, ``federation.min_train`` / ``min_evaluate`` are
capped at their number (a round cannot wait for a hospital that is not
there); nothing else of the preset changes.

Prints one table per preset (score, model file, selected round, wall time)
and whether federated >= every local-only model at each held-out hospital;
``--out`` writes the same as JSON. ``--override KEY=VALUE`` changes the
presets (printed as NOT the preset): for smoke checks only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.atomic import atomic_file  # noqa: E402
from common.compose import compose_settings, finalize  # noqa: E402
from common.config import ConfigError, Settings  # noqa: E402
from common.data import load_site  # noqa: E402
from common.evaluation import evaluate  # noqa: E402
from common.models import build_model  # noqa: E402
from common.processes import stop_children_on_signals  # noqa: E402
from common.training import resolve_device  # noqa: E402
from server.app import hospital_names  # noqa: E402
from server.baseline import train_centralized  # noqa: E402
from server.checkpoint import FINAL_MODEL  # noqa: E402
from simulate import simulate  # noqa: E402

SELECTED_MODEL = "best_model.pt"
"""The validation-selected model a run folder may hold beside ``final_model.pt``."""
HEADLINE = {"classification": "auc", "segmentation": "dice"}
PRESETS = ("pneumonia", "brain_mri")


def preset(name: str, overrides: list[str]) -> Settings:
    """The experiment preset ``name`` (plus smoke-check overrides), paths made absolute."""
    return finalize(compose_settings([f"experiment={name}", *overrides]), base=ROOT)


def with_hospitals(base: Settings, hospitals: list[int], run_dir: Path) -> Settings:
    """``base`` with only ``hospitals`` taking part (the data divided as with all of them)."""
    fed = base.federation
    federation = dataclasses.replace(fed, min_train=min(fed.min_train, len(hospitals)),
                                     min_evaluate=min(fed.min_evaluate, len(hospitals)))
    data = dataclasses.replace(base.data, hospitals=list(hospitals))
    return dataclasses.replace(base, data=data, federation=federation, run_dir=str(run_dir))


def every_image(settings: Settings, hospital: int) -> Dataset:
    """All of ``hospital``'s samples: its train, val and test splits (never augmented)."""
    site = load_site(settings, hospital)
    return ConcatDataset([site.train, site.val, site.test])


def score_run(settings: Settings, run_dir: Path, images: Dataset) -> dict[str, Any]:
    """Score a run folder's selected (else final) model on ``images``.

    Returns:
        The metrics (``auc`` or ``dice``, ``loss``, ... ``num-examples``) and
        ``model``, the weights file scored.
    """
    path = run_dir / SELECTED_MODEL
    if not path.is_file():
        path = run_dir / FINAL_MODEL
    device = resolve_device(settings.train.device)
    model = build_model(settings.task, settings.model).to(device)
    model.load_state_dict(torch.load(path, map_location=device, weights_only=True))
    loader = DataLoader(images, batch_size=max(64, settings.data.batch_size))
    return {**evaluate(model, loader, task=settings.task, device=device), "model": path.name}


def train_and_score(kind: str, settings: Settings, images: Dataset) -> dict[str, Any]:
    """Train one model (``federated`` or centralized), time it, score it on ``images``."""
    started = time.perf_counter()
    summary = simulate(settings) if kind == "federated" else train_centralized(settings)
    wall = time.perf_counter() - started
    selection = summary.get("selection") or {}
    return {**score_run(settings, Path(settings.run_dir), images), "wall_s": round(wall, 1),
            "selected_round": selection.get("round"),
            "trained_on": list(settings.data.hospitals or [])}


def held_out_rows(base: Settings, held_out: int, runs: Path) -> dict[str, Any]:
    """Federated, local-only (each other hospital) and pooled, scored at ``held_out``."""
    names = hospital_names(base)
    others = [h for h in range(base.federation.num_hospitals) if h != held_out]
    images = every_image(base, held_out)
    folder = runs / f"{base.name}-without-{names[held_out]}"
    rows = {"federated": train_and_score(
        "federated", with_hospitals(base, others, folder / "federated"), images)}
    for k in others:
        rows[f"local-only {names[k]}"] = train_and_score(
            "central", with_hospitals(base, [k], folder / f"local-{names[k]}"), images)
    rows["pooled"] = train_and_score("central", with_hospitals(base, others, folder / "pooled"),
                                     images)
    metric = HEADLINE[base.task.kind]
    federated = rows["federated"][metric]
    local = [r[metric] for key, r in rows.items() if key.startswith("local-only")]
    return {"hospital": names[held_out], "images": len(images),  # type: ignore[arg-type]
            "metric": metric, "rows": rows, "federated_ge_local": federated >= max(local)}


def print_table(name: str, results: list[dict[str, Any]], overrides: list[str]) -> None:
    """One preset's leave-one-hospital-out table."""
    if not results:
        return
    metric = results[0]["metric"]
    label = f"OVERRIDES, NOT THE PRESET: {' '.join(overrides)}" if overrides else "preset"
    print(f"\n== {name} ({label}): {metric} on every image of the held-out hospital ==")
    print(f"{'held out':<20} {'model':<24} {metric:>7}  {'file':<14} {'round':>5} {'wall s':>8}")
    for result in results:
        head = f"{result['hospital']} ({result['images']})"
        for key, row in result["rows"].items():
            selected = "-" if row["selected_round"] is None else str(row["selected_round"])
            print(f"{head:<20} {key:<24} {row[metric]:7.4f}  {row['model']:<14} {selected:>5} "
                  f"{row['wall_s']:8.1f}")
            head = ""
        verdict = "yes" if result["federated_ge_local"] else "NO"
        print(f"{'':<20} federated >= every local-only: {verdict}")


def parse(argv: list[str]) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="bench/generalization.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), help="experiments")
    parser.add_argument("--held-out", nargs="+", type=int, default=None,
                        help="hospital indices to hold out (default: every hospital)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--runs", type=Path,
                        help="keep the run folders here (default: a temporary folder)")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="change every preset (NOT the preset: smoke checks only)")
    return parser.parse_args(argv)


def bench(args: argparse.Namespace, runs: Path) -> dict[str, Any]:
    """Every preset's table; results as written to ``--out``."""
    report: dict[str, Any] = {"overrides": args.override, "presets": {}}
    for name in args.presets:
        base = preset(name, args.override)
        held = args.held_out or list(range(base.federation.num_hospitals))
        bad = [h for h in held if not 0 <= h < base.federation.num_hospitals]
        if bad:
            raise ConfigError(f"--held-out {bad[0]}: {name} has hospitals 0.."
                              f"{base.federation.num_hospitals - 1}")
        results = [held_out_rows(base, h, runs) for h in held]
        report["presets"][name] = results
        print_table(name, results, args.override)
        if args.out:
            with atomic_file(args.out, "w") as handle:
                handle.write(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str]) -> int:
    """Command line in, exit code out (0: every table measured)."""
    args = parse(argv)
    stop_children_on_signals()
    if args.override:
        print(f"!! --override {' '.join(args.override)}: these are NOT the presets' settings; "
              "for smoke checks only, not for reporting")
    try:
        if args.runs:
            args.runs.mkdir(parents=True, exist_ok=True)
            report = bench(args, args.runs.resolve())
        else:
            with tempfile.TemporaryDirectory(prefix="medfed-loho-") as tmp:
                report = bench(args, Path(tmp))
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if len(report["presets"]) > 1:  # all tables again, together at the end
        for name, results in report["presets"].items():
            print_table(name, results, args.override)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
