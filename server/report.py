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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import wire
from common.atomic import atomic_file
from common.logs import medfed_logger

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
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
    round_line: dict[str, str] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

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

    def record(self, round_: int, phase: str, replies: list[dict[str, Any]],
               overall: dict[str, Any]) -> None:
        """Log one phase of a round: a row per hospital and one ``overall``."""
        rows = [{"round": round_, "phase": phase, "hospital": self.name(m), **_clean(m)}
                for m in replies]
        rows.append({"round": round_, "phase": phase, "hospital": "overall", **_clean(overall)})
        self._append(rows)
        latest = self.last_train if phase == "train" else self.last_evaluate
        for row in rows:
            latest[row["hospital"]] = row
            if phase == "train" and wire.EPSILON in row and row["hospital"] != "overall":
                self.privacy[row["hospital"]] = {k: row[k] for k in PRIVACY_KEYS if k in row}
        if phase == "train":
            answered = len(replies)
            # DP-SGD hospitals send no training loss (it is not noised)
            loss = overall.get(wire.TRAIN_LOSS)
            eps = [f"{n} {p[wire.EPSILON]:.2f}" for n, p in sorted(self.privacy.items())]
            self.round_line["train"] = (
                f"hospitals answered {answered}/{len(self.hospital_names)}"
                + (f" | train loss {loss:.4f}" if loss is not None else "")
                + (f" | epsilon {', '.join(eps)}" if eps else "")
            )
        elif phase == "evaluate":
            key = HEADLINE[self.task_kind]
            value = overall.get(key)
            self.round_line["evaluate"] = (
                f"federated {key} {value:.4f}" if value is not None else "federated eval: none"
            )

    def record_central(self, round_: int, metrics: dict[str, Any]) -> None:
        """Log the server's evaluation on the central held-out test set."""
        self._append([{"round": round_, "phase": "central", "hospital": "central",
                       **_clean(metrics)}])
        self.central = {"round": round_, **_clean(metrics)}
        key = HEADLINE[self.task_kind]
        if key in metrics:
            self.round_line["central"] = f"central test {key} {metrics[key]:.4f}"

    def record_client_privacy(self, round_: int, figures: dict[str, float]) -> None:
        """Log the client-level DP guarantee after ``round_`` noisy rounds."""
        self._append([{"round": round_, "phase": "privacy", "hospital": "client-level",
                       **_clean(figures)}])
        self.privacy["client-level"] = figures
        self.round_line["central"] = (self.round_line.get("central", "") +
                                      f" | client-level epsilon {figures['epsilon']:.2f}")

    def end_round(self, round_: int) -> None:
        """Print the progress line of a completed round."""
        parts = [self.round_line.pop(k) for k in ("train", "evaluate", "central")
                 if k in self.round_line]
        elapsed = time.monotonic() - self.started
        self._append([{"round": round_, "phase": "round", "hospital": "overall",
                       "elapsed_s": round(elapsed, 3)}])
        log.info("[MedFed] round %d/%d | %s", round_, self.total_rounds, " | ".join(parts))

    def failure(self, round_: int, phase: str, hospital: str, reason: str) -> None:
        """Log a hospital's failed or dropped reply."""
        log.warning("[MedFed] round %d %s: %s: %s", round_, phase, hospital, reason)
        self._append([{"round": round_, "phase": phase, "hospital": hospital, "error": reason}])

    def bounded(self, round_: int, hospital: str, reason: str) -> None:
        """Log a training reply the server clipped or re-weighted before aggregating it."""
        log.warning("[MedFed] round %d train: %s: %s", round_, hospital, reason)
        self._append([{"round": round_, "phase": "bounds", "hospital": hospital,
                       "bounded": reason}])

    def write_summary(self, *, experiment: str, rounds: int, wall_time_s: float) -> dict[str, Any]:
        """Write ``summary.json`` from the last round's metrics and return it."""
        hospitals = {name: {k: v for k, v in row.items() if k not in ("round", "phase", "hospital")}
                     for name, row in sorted(self.last_evaluate.items()) if name != "overall"}
        summary = {
            "experiment": experiment,
            "task": self.task_kind,
            "rounds": rounds,
            "wall_time_s": round(wall_time_s, 2),
            "hospitals": hospitals,
            "overall": {k: v for k, v in self.last_evaluate.get("overall", {}).items()
                        if k not in ("round", "phase", "hospital")},
            "central": self.central,
            "train": {name: {k: v for k, v in row.items()
                             if k not in ("round", "phase", "hospital")}
                      for name, row in self.last_train.items()},
            "privacy": dict(sorted(self.privacy.items())),
        }
        atomic_write_text(self.run_dir / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
        return summary
