"""Federated vs centralized, measured side by side in one run.

    .venv/bin/python bench/federated_vs_central.py                 # pneumonia and brain_mri
    .venv/bin/python bench/federated_vs_central.py pneumonia -- federation.rounds=3

For each experiment, runs the federated simulation (``python simulate.py``)
and the centralized baseline (``python -m server.baseline``) with the same
model, optimizer and epoch budget (rounds x local epochs), each as a fresh
process timed from start to exit, and prints:

- wall time federated / centralized, and the federated run's fixed cost:
  fixed s = federated wall - rounds x steady round (the pace of rounds 2..N),
  with a timeline of where it goes (launcher and SuperLink up, ``flwr run``
  submitted, ServerApp ready, round 1, the last round, exit), read from the
  federated run's own log lines as they arrive;
- federated metric / centralized metric on the same test sets (test AUC on
  the central test split for pneumonia, mean Dice over the hospitals' test
  slices for brain_mri).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
HEADLINE = {"pneumonia": ("central", "auc"), "brain_mri": ("overall", "dice")}


# Log lines of ``simulate.py --verbose`` that mark the phases of a run's fixed cost
MARKS = (("SuperLink up", "Using SuperLink"),
         ("run submitted", "Successfully started run"),
         ("simulation started", "Starting Flower Simulation"),
         ("ServerApp ready", "Starting CheckedStrategy"),
         ("round 1 done", "[MedFed] round 1/"),
         ("last round done", "Strategy execution finished"),
         ("summary printed", "wall time "))


def timed(argv: list[str]) -> float:
    """Run a command to completion; return its wall time in seconds."""
    started = time.perf_counter()
    subprocess.run(argv, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def timed_with_marks(argv: list[str]) -> tuple[float, dict[str, float]]:
    """Run a command, noting when each of :data:`MARKS` first appears in its output.

    Returns:
        (wall seconds, {mark: seconds since start}).
    """
    started = time.perf_counter()
    seen: dict[str, float] = {}
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        for label, needle in MARKS:
            if label not in seen and needle in line:
                seen[label] = time.perf_counter() - started
    if proc.wait() != 0:
        raise subprocess.CalledProcessError(proc.returncode, argv)
    return time.perf_counter() - started, seen


def round_ends(run_dir: Path) -> list[float]:
    """Seconds since the ServerApp started at which each round ended."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["elapsed_s"] for r in rows if r["phase"] == "round"]


def train_seconds(run_dir: Path) -> float:
    """Seconds of local training summed over rounds (the slowest hospital per round)."""
    per_round: dict[int, float] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["phase"] == "train" and row["hospital"] != "overall" and "train-seconds" in row:
            per_round[row["round"]] = max(per_round.get(row["round"], 0.0), row["train-seconds"])
    return sum(per_round.values())


def compare(experiment: str, overrides: list[str], workdir: Path) -> dict[str, Any]:
    """Run both sides of one experiment and return the figures."""
    fed_dir, central_dir = workdir / f"{experiment}-fed", workdir / f"{experiment}-central"
    common = [f"experiment={experiment}", *overrides]
    fed_wall, marks = timed_with_marks([sys.executable, "simulate.py", *common,
                                        f"run_dir={fed_dir}", "--verbose"])
    central_wall = timed([sys.executable, "-m", "server.baseline", *common,
                          f"run_dir={central_dir}"])
    fed = json.loads((fed_dir / "summary.json").read_text())
    central = json.loads((central_dir / "summary.json").read_text())
    section, metric = HEADLINE[experiment]
    return {
        "fed_wall_s": fed_wall,
        "central_wall_s": central_wall,
        "fed_rounds_s": float(fed["wall_time_s"]),
        "fed_train_s": train_seconds(fed_dir),
        "fed_round_ends": round_ends(fed_dir),
        "fed_marks": marks,
        "central_train_s": float(central["train_time_s"]),
        "fed_metric": float(fed[section][metric]),
        "central_metric": float(central[section][metric]),
        "metric": f"{section} {metric}",
    }


def overhead_lines(r: dict[str, Any]) -> list[str]:
    """Where the wall time of each side goes: fixed costs and the pace of training.

    Federated fixed cost = time outside the ServerApp's rounds (SuperLink,
    ``flwr run``, the ServerApp process starting and exiting, SuperLink
    stop) + what round 1 takes beyond a steady round (Ray and its actors
    starting, each importing torch/MONAI, first-call warm-up). Centralized
    fixed cost = its wall time outside training (imports, data, evaluation).
    """
    ends = r["fed_round_ends"]
    outside = r["fed_wall_s"] - r["fed_rounds_s"]
    lines = [f"  centralized: fixed {r['central_wall_s'] - r['central_train_s']:.1f} s + "
             f"training {r['central_train_s']:.1f} s"]
    if len(ends) < 3:
        return [*lines, f"  federated: outside the rounds {outside:.1f} s + rounds "
                f"{r['fed_rounds_s']:.1f} s"]
    pace = (ends[-1] - ends[0]) / (len(ends) - 1)  # seconds per round after round 1
    first_extra = ends[0] - pace
    steady = pace * len(ends)
    fixed = outside + first_extra + (r["fed_rounds_s"] - ends[-1])
    central_fixed = r["central_wall_s"] - r["central_train_s"]
    pace_ratio = steady / r["central_train_s"]
    marks = r.get("fed_marks", {})
    timeline = " | ".join(f"{label} {marks[label]:.1f}" for label, _ in MARKS if label in marks)
    lines = [
        f"  federated: fixed {fixed:.1f} s = wall {r['fed_wall_s']:.1f} s - {len(ends)} rounds "
        f"x steady round {pace:.2f} s (outside the ServerApp's rounds {outside:.1f} s, "
        f"round 1 beyond a steady round {first_extra:.1f} s; local training "
        f"{r['fed_train_s']:.1f} s on the slowest hospital per round)",
        f"  federated timeline, s since start: {timeline}",
        *lines,
        f"  training pace federated / centralized {pace_ratio:.2f}; extra fixed cost "
        f"{fixed - central_fixed:.1f} s",
    ]
    if pace_ratio < 1.5:
        # wall ratio = (pace_ratio * T + fixed) / (T + central_fixed) <= 1.5
        needed = (fixed - 1.5 * central_fixed) / (1.5 - pace_ratio)
        lines.append(f"  at this pace the wall ratio is <= 1.5 once centralized training "
                     f"takes >= {max(needed, 0.0):.0f} s")
    return lines


def main(argv: list[str]) -> int:
    """Command line: experiment names, then ``--`` and shared overrides."""
    split = argv.index("--") if "--" in argv else len(argv)
    experiments = argv[:split] or list(HEADLINE)
    overrides = argv[split + 1:]
    with tempfile.TemporaryDirectory(prefix="medfed-bench-") as tmp:
        for experiment in experiments:
            r = compare(experiment, overrides, Path(tmp))
            print(f"\n== {experiment} ({' '.join(overrides) or 'preset'}) ==")
            ratio = r["fed_wall_s"] / r["central_wall_s"]
            print(f"wall time      federated {r['fed_wall_s']:7.1f} s | centralized "
                  f"{r['central_wall_s']:7.1f} s | ratio {ratio:.2f}")
            for line in overhead_lines(r):
                print(line)
            print(f"{r['metric']:<14} federated {r['fed_metric']:.4f} | centralized "
                  f"{r['central_metric']:.4f} | ratio {r['fed_metric'] / r['central_metric']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
