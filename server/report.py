"""The run folder: per-round per-hospital metrics, progress lines, summary.

Files written into ``run_dir``:

- ``metrics.jsonl``: one JSON object per line, with ``round``, ``phase``
  (``train``, ``evaluate``, ``central``, ``privacy``, ``bounds`` (a reply
  clipped or re-weighted), or ``round`` whose
  ``elapsed_s`` is the time since the ServerApp started when the round
  ended), ``hospital`` (a name, or ``overall`` for the aggregate) and the
  metric values.
- ``summary.json``: final metrics per hospital and overall under plain names
  (``auc``, ``accuracy``, ``sensitivity``, ``specificity``, ``dice``, ...),
  central test metrics, privacy per hospital, wall time.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import wire
from common.atomic import atomic_file
from common.logs import medfed_logger
from server.round_report import PhaseReport, RoundReport, SelectionStep

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
# Why a run failed, first line first (written by the ServerApp or the launcher)
ERROR_FILE = "error.txt"
PRIVACY_KEYS = (wire.EPSILON, wire.DELTA, wire.NOISE_MULTIPLIER, wire.SAMPLE_RATE, wire.DP_STEPS)
HEADLINE = {"classification": "auc", "segmentation": "dice"}

log = medfed_logger()


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and ``os.replace``."""
    with atomic_file(path, "w") as handle:
        handle.write(text)


def _clean(metrics: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in metrics.items():
        if key == wire.HOSPITAL:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            value = None
        out[key] = value
    return out


@dataclass
class RunRecorder:
    """Collects what each round produced and writes it to the run folder.

    Attributes:
        run_dir: the run folder (created if missing).
        task_kind: ``classification`` or ``segmentation`` (picks the headline metric).
        total_rounds: rounds planned, for ``round k/N`` progress lines.
        hospital_names: display name per hospital index.
    """

    run_dir: Path
    task_kind: str
    total_rounds: int
    hospital_names: list[str]
    last_train: dict[str, dict[str, Any]] = field(default_factory=dict)
    last_evaluate: dict[str, dict[str, Any]] = field(default_factory=dict)
    privacy: dict[str, dict[str, Any]] = field(default_factory=dict)
    central: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    tracker: Any = None  # server.tracking.Tracker: gets every row written (tracking=...)

    def __post_init__(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)

    def name(self, metrics: dict[str, Any]) -> str:
        """Hospital name of a reply's metrics (by its ``hospital`` index)."""
        index = int(metrics.get(wire.HOSPITAL, -1))
        if 0 <= index < len(self.hospital_names):
            return self.hospital_names[index]
        return f"hospital-{index}"

    def _append(self, rows: list[dict[str, Any]]) -> None:
        with open(self.run_dir / METRICS_FILE, "a") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
        if self.tracker is not None:
            self.tracker.log_rows(rows)

    def close_tracker(self) -> None:
        """Close the tracker (end of the run); later rows go to metrics.jsonl only."""
        if self.tracker is not None:
            self.tracker.close()
            self.tracker = None

    def write_rows(self, report: RoundReport) -> None:
        """Write a completed round's rows to ``metrics.jsonl``.

        In order: per-hospital and ``overall`` train rows, the same for
        evaluate, ``central``, ``privacy`` (client-level DP).
        """
        round_ = report.round
        for phase in (report.train, report.evaluate):
            if phase is not None:
                self._write_phase(round_, phase)
        if report.central is not None:
            self._append([{"round": round_, "phase": "central", "hospital": "central",
                           **_clean(report.central)}])
            self.central = {"round": round_, **_clean(report.central)}
        if report.client_privacy is not None:
            self._append([{"round": round_, "phase": "privacy", "hospital": "client-level",
                           **_clean(report.client_privacy)}])
            self.privacy["client-level"] = report.client_privacy

    def end_round(self, report: RoundReport) -> None:
        """Write the ``round`` row (time since the ServerApp started) and the progress line."""
        parts = []
        if report.train is not None:
            parts.append(self._train_line(report.train))
        if report.evaluate is not None or report.train is not None:
            parts.append(self._evaluate_line(report.evaluate, report.selection))
        key = HEADLINE[self.task_kind]
        if report.central is not None and key in report.central:
            parts.append(f"central test {key} {report.central[key]:.4f}")
        if report.client_privacy is not None:
            parts.append(f"client-level epsilon {report.client_privacy['epsilon']:.2f}")
        elapsed = time.monotonic() - self.started
        self._append([{"round": report.round, "phase": "round", "hospital": "overall",
                       "elapsed_s": round(elapsed, 3)}])
        log.info("[MedFed] round %d/%d | %s", report.round, self.total_rounds, " | ".join(parts))

    def _write_phase(self, round_: int, phase: PhaseReport) -> None:
        """A row per hospital and one ``overall``; remembered as the latest."""
        rows = [{"round": round_, "phase": phase.phase, "hospital": self.name(m), **_clean(m)}
                for m in phase.replies]
        rows.append({"round": round_, "phase": phase.phase, "hospital": "overall",
                     **_clean(phase.overall)})
        self._append(rows)
        latest = self.last_train if phase.phase == "train" else self.last_evaluate
        for row in rows:
            latest[row["hospital"]] = row
            if phase.phase == "train" and wire.EPSILON in row and row["hospital"] != "overall":
                self.privacy[row["hospital"]] = {k: row[k] for k in PRIVACY_KEYS if k in row}

    def _train_line(self, train: PhaseReport) -> str:
        # DP-SGD hospitals send no training loss (it is not noised)
        loss = train.overall.get(wire.TRAIN_LOSS)
        eps = [f"{n} {p[wire.EPSILON]:.2f}" for n, p in sorted(self.privacy.items())
               if n != "client-level"]
        return (f"hospitals answered {len(train.replies)}/{len(self.hospital_names)}"
                + (f" | train loss {loss:.4f}" if loss is not None else "")
                + (f" | epsilon {', '.join(eps)}" if eps else ""))

    def _evaluate_line(self, evaluate: PhaseReport | None, step: SelectionStep | None) -> str:
        key = HEADLINE[self.task_kind]
        value = None if evaluate is None else evaluate.overall.get(key)
        line = f"federated {key} {value:.4f}" if value is not None else "federated eval: none"
        if step is not None:
            best = ("best so far" if step.stale == 0
                    else f"best {step.best_value:.4f} in round {step.best_round}")
            line += f" | validation {step.metric} {step.value:.4f} ({best})"
        return line

    def failure(self, round_: int, phase: str, hospital: str, reason: str, *,
                node: int | None = None) -> None:
        """Log a hospital's failed, dropped or missing reply, at once.

        ``node`` (the Flower node id, when known) is kept in the row beside
        the hospital's name.
        """
        log.warning("[MedFed] round %d %s: %s: %s", round_, phase, hospital, reason)
        row: dict[str, Any] = {"round": round_, "phase": phase, "hospital": hospital}
        if node is not None:
            row["node"] = node
        self._append([{**row, "error": reason}])

    def bounded(self, round_: int, hospital: str, reason: str) -> None:
        """Log a training reply the server clipped or re-weighted before aggregating it."""
        log.warning("[MedFed] round %d train: %s: %s", round_, hospital, reason)
        self._append([{"round": round_, "phase": "bounds", "hospital": hospital,
                       "bounded": reason}])

    def round_rows(self, round_: int) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
        """The evaluation rows (by hospital, ``overall`` included) and central scores of a
        round, read back from ``metrics.jsonl`` (a repeated round: its last rows)."""
        evaluate: dict[str, dict[str, Any]] = {}
        central: dict[str, Any] = {}
        path = self.run_dir / METRICS_FILE
        lines = path.read_text().splitlines() if path.exists() else []
        for row in map(json.loads, lines):
            if row.get("round") != round_ or "error" in row:
                continue
            if row.get("phase") == "evaluate":
                evaluate[row["hospital"]] = row
            elif row.get("phase") == "central":
                central = {k: v for k, v in row.items() if k not in ("phase", "hospital")}
        return evaluate, central

    def write_summary(self, *, experiment: str, rounds: int, wall_time_s: float,
                      selection: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write ``summary.json`` and return it.

        ``hospitals``, ``overall`` and ``central`` are the test metrics of the
        selected model (``selection["round"]``), else of the last round;
        ``last_round`` keeps the last round's beside them.
        """
        last = _summary_rows(self.last_evaluate, self.central)
        chosen = (selection or {}).get("round")
        picked = _summary_rows(*self.round_rows(int(chosen))) if chosen else last
        summary = {
            "experiment": experiment,
            "task": self.task_kind,
            "rounds": rounds,
            "wall_time_s": round(wall_time_s, 2),
            **picked,
            "train": {name: {k: v for k, v in row.items()
                             if k not in ("round", "phase", "hospital")}
                      for name, row in self.last_train.items()},
            "privacy": dict(sorted(self.privacy.items())),
        }
        if selection is not None:
            summary["selection"] = selection
            summary["last_round"] = {"round": max((r.get("round", 0) for r in
                                                   self.last_evaluate.values()), default=None),
                                     **last}
        atomic_write_text(self.run_dir / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
        return summary


def _summary_rows(evaluate: dict[str, dict[str, Any]], central: dict[str, Any]
                  ) -> dict[str, Any]:
    """``hospitals``, ``overall`` and ``central`` of a summary, from a round's rows."""
    def plain(row: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in row.items() if k not in ("round", "phase", "hospital")}

    return {"hospitals": {name: plain(row) for name, row in sorted(evaluate.items())
                          if name != "overall"},
            "overall": plain(evaluate.get("overall", {})),
            "central": central}


def main(argv: list[str] | None = None) -> int:
    """``python -m server.report RUN_DIR``: rebuild the run folder's ``report.html``."""
    import argparse

    from server.run_report import build_report

    parser = argparse.ArgumentParser(prog="python -m server.report",
                                     description="Rebuild RUN_DIR/report.html.")
    parser.add_argument("run_dir", type=Path, help="a run folder (with summary.json)")
    args = parser.parse_args(argv)
    try:
        print(build_report(args.run_dir))
    except (OSError, ValueError, KeyError) as err:
        print(f"report error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
