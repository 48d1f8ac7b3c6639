"""Honest and attacked federations side by side, in one run: final central test AUC.

    .venv/bin/python bench/robustness.py                       # the stated reduced budget
    .venv/bin/python bench/robustness.py --rounds 20 --local-epochs 4   # the full preset
    .venv/bin/python bench/robustness.py --strategies default --attacks sign_flip

Every run is a real Flower simulation of the ``pneumonia`` experiment
(PneumoniaMNIST, 3 hospitals with label skew, central AUC on the file's test
split) started by ``simulate.py``'s machinery. In an attacked run hospital 0
is hostile: a real ClientApp (``bench/hostile_app.py``, submitted as a copy
of the project) that runs MedFed's ClientApp, guard included, and corrupts
the reply afterwards. Strategies: ``default`` (MedFed's default: FedAvg with
the influence bounds of ``conf/config.yaml``), ``fedmedian``,
``fedtrimmedavg`` and ``krum`` (each with MedFed's reply checks and bounds),
plus one honest row of ``plain-fedavg`` (every bound off) to show that the
default keeps FedAvg's accuracy (``--strategies plain-fedavg`` attacks it too,
to show what the bounds buy). A run that fails is reported as ``failed``.

Budget: the preset itself is 20 rounds x 4 local epochs (~2 min a run on 2
quiet cores); 25 such runs would take an hour, so the default here is
``--rounds 5 --local-epochs 1`` and the budget used is printed with the
table. ``federation.min_train=2`` lets a round go on when the hostile reply
is dropped; federated evaluation is off (the central AUC is the figure).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from bench.hostile_app import hostile_project  # noqa: E402
from common.compose import compose_settings, finalize  # noqa: E402
from server.runner import RunFailedError  # noqa: E402
from simulate import simulate  # noqa: E402

ATTACKS = ("finite_1e38", "num_examples_1e12", "float64_1e300", "scaled_x1000", "sign_flip")
PLAIN_FEDAVG = ["strategy.norm_bound=none", "strategy.min_cosine=null",
                "strategy.max_weight_share=1.0"]
STRATEGIES = {
    "default": [],
    "fedmedian": ["strategy=fedmedian"],
    "fedtrimmedavg": ["strategy=fedtrimmedavg"],
    "krum": ["strategy=krum"],
    "plain-fedavg": PLAIN_FEDAVG,
}
GRID = ("default", "fedmedian", "fedtrimmedavg", "krum")


def final_auc(overrides: list[str], attack: str | None, workdir: Path, log: Path
              ) -> float | None:
    """Central test AUC after the last round of one run (None if the run failed)."""
    name = attack or "honest"
    settings = finalize(compose_settings([*overrides, f"run_dir={workdir / 'run'}"]), base=ROOT)
    project = hostile_project(workdir / "app", {0: attack} if attack else {})
    with open(log, "w") as out, contextlib.redirect_stdout(out):
        try:
            summary = simulate(settings, project_dir=project)
        except RunFailedError as err:
            print(f"{name}: {err}")
            return None
    return float(summary["central"]["auc"])


def main(argv: list[str]) -> int:
    """Run the grid and print the table; extra Hydra overrides follow ``--``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--strategies", default=",".join(GRID),
                        help=f"comma-separated, of: {', '.join(STRATEGIES)}")
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--no-plain", action="store_true", help="skip the plain-fedavg row")
    parser.add_argument("--workdir", type=Path, help="keep run folders and logs here")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    args = parser.parse_args(argv)
    strategies = [s for s in args.strategies.split(",") if s]
    attacks = [a for a in args.attacks.split(",") if a]
    unknown = sorted(set(strategies) - set(STRATEGIES)) + sorted(set(attacks) - set(ATTACKS))
    if unknown:
        parser.error(f"unknown strategy or attack {unknown[0]!r}")
    base = ["experiment=pneumonia", f"federation.rounds={args.rounds}",
            f"federation.local_epochs={args.local_epochs}", "federation.min_train=2",
            "federation.fraction_evaluate=0", *args.overrides]
    rows = [(s, STRATEGIES[s], attacks) for s in strategies]
    if not args.no_plain and "plain-fedavg" not in strategies:
        rows.insert(0, ("plain-fedavg", PLAIN_FEDAVG, []))
    table: dict[str, dict[str, float | None]] = {}
    started = time.perf_counter()
    keep = contextlib.nullcontext(str(args.workdir)) if args.workdir else \
        tempfile.TemporaryDirectory(prefix="medfed-robustness-")
    with keep as tmp:
        for strategy, extra, row_attacks in rows:
            for attack in [None, *row_attacks]:
                work = Path(tmp) / strategy / (attack or "honest")
                work.mkdir(parents=True)
                auc = final_auc([*base, *extra], attack, work, work / "bench.log")
                table.setdefault(strategy, {})[attack or "honest"] = auc
                shown = "failed" if auc is None else f"{auc:.4f}"
                print(f"  {strategy:<14} {attack or 'honest':<18} AUC {shown}", flush=True)
    print_table(table, attacks, base, time.perf_counter() - started)
    return 0


def print_table(table: dict[str, dict[str, float | None]], attacks: list[str],
                base: list[str], wall_s: float) -> None:
    """Markdown table: strategy x (honest, attacks), AUC and difference from honest."""
    print(f"\nBudget: {' '.join(base)} (hostile: hospital 0 of 3); wall {wall_s / 60:.1f} min")
    print("| strategy | honest | " + " | ".join(attacks) + " |")
    print("|---" * (len(attacks) + 2) + "|")
    for strategy, cells in table.items():
        honest = cells.get("honest")
        parts = []
        for attack in attacks:
            if attack not in cells:
                parts.append("")
                continue
            auc = cells[attack]
            if auc is None:
                parts.append("failed")
            else:
                diff = f" ({auc - honest:+.3f})" if honest is not None else ""
                parts.append(f"{auc:.4f}{diff}")
        shown = "failed" if honest is None else f"{honest:.4f}"
        print(f"| {strategy} | {shown} | " + " | ".join(parts) + " |")
    print(json.dumps(table))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
