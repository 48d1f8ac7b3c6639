"""Experiment tracking: every ``metrics.jsonl`` row also goes to TensorBoard or MLflow.

Setting ``tracking`` picks the tracker: ``tensorboard`` (event files under
``RUN_DIR/tensorboard``), ``mlflow`` (a local file store under
``RUN_DIR/mlruns``, no server; experiment = the run's ``name``) or ``none``.
Each numeric value of a row is one scalar named
``<phase>/<metric>/<hospital>`` at step = the round; the config is logged
once (TensorBoard: text + hparams at the end; MLflow: flattened params +
``config.json`` as an artifact). The libraries are imported only when a
tracker is made.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

from common.config import Settings, settings_to_json

SKIPPED = frozenset({"round", "node"})
TENSORBOARD_DIR = "tensorboard"
MLFLOW_DIR = "mlruns"


class Tracker(Protocol):
    """What :class:`server.report.RunRecorder` calls."""

    def log_rows(self, rows: Iterable[dict[str, Any]]) -> None: ...

    def close(self) -> None: ...


def scalars(rows: Iterable[dict[str, Any]]) -> Iterator[tuple[str, float, int]]:
    """``(tag, value, round)`` for every finite numeric value of every row.

    Strings, booleans, lists (ROC points) and non-finite values are left out.
    """
    for row in rows:
        phase, hospital = row.get("phase"), row.get("hospital")
        step = row.get("round")
        if not isinstance(phase, str) or not isinstance(step, int):
            continue
        if isinstance(row.get("model"), str):  # personalise rows: global / personalised
            phase = f"{phase}-{row['model']}"
        for key, value in row.items():
            if (key in SKIPPED or isinstance(value, bool) or not isinstance(value, int | float)
                    or not math.isfinite(value)):
                continue
            yield f"{_safe(phase)}/{_safe(key)}/{_safe(str(hospital))}", float(value), step


def _safe(name: str) -> str:
    """Characters MLflow accepts in a key (others become ``_``)."""
    return re.sub(r"[^A-Za-z0-9_.\- ]", "_", name)


def flat_config(settings: Settings) -> dict[str, str | int | float | bool]:
    """Settings as ``section.key`` -> scalar (lists and null as JSON text)."""
    out: dict[str, str | int | float | bool] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else key, inner)
        elif isinstance(value, str | int | float | bool):
            out[prefix] = value
        else:
            out[prefix] = json.dumps(value)

    walk("", json.loads(settings_to_json(settings)))
    return out


class TensorBoardTracker:
    """Scalars into ``run_dir/tensorboard`` with torch's ``SummaryWriter``."""

    def __init__(self, settings: Settings, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.config = flat_config(settings)
        self.writer = SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR))
        self.writer.add_text("config", "```\n" + json.dumps(
            json.loads(settings_to_json(settings)), indent=2) + "\n```", 0)
        self.last: dict[str, float] = {}

    def log_rows(self, rows: Iterable[dict[str, Any]]) -> None:
        for tag, value, step in scalars(rows):
            self.writer.add_scalar(tag, value, step)
            if tag.startswith("evaluate/") and tag.endswith("/overall"):
                self.last[tag] = value
        self.writer.flush()

    def close(self) -> None:
        """Write the hparams (config + last overall evaluation figures) and close."""
        metrics = {f"hparam/{tag}": value for tag, value in self.last.items()}
        if metrics:
            self.writer.add_hparams(self.config, metrics, run_name=".")
        self.writer.close()


class MlflowTracker:
    """Metrics into a local MLflow file store ``run_dir/mlruns`` (no server)."""

    def __init__(self, settings: Settings, run_dir: Path) -> None:
        self.client = mlflow_client(run_dir / MLFLOW_DIR)
        found = self.client.get_experiment_by_name(settings.name)
        experiment = (found.experiment_id if found is not None
                      else self.client.create_experiment(settings.name))
        earlier = self.client.search_runs([experiment], max_results=1) if settings.resume else []
        if earlier:
            self.run_id = earlier[0].info.run_id
            return
        self.run_id = self.client.create_run(experiment, run_name=run_dir.name).info.run_id
        params = _params(flat_config(settings))
        for start in range(0, len(params), 100):  # MLflow's batch limit for params
            self.client.log_batch(self.run_id, params=params[start:start + 100])
        self.client.log_text(self.run_id, json.dumps(json.loads(settings_to_json(settings)),
                                                     indent=2), "config.json")

    def log_rows(self, rows: Iterable[dict[str, Any]]) -> None:
        from mlflow.entities import Metric

        now = _millis()
        metrics = [Metric(tag, value, now, step) for tag, value, step in scalars(rows)]
        for start in range(0, len(metrics), 1000):  # MLflow's batch limit
            self.client.log_batch(self.run_id, metrics=metrics[start:start + 1000])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def mlflow_client(store: Path) -> Any:
    """An ``MlflowClient`` on the local file store ``store`` (created if missing).

    MLflow 3 refuses file stores unless ``MLFLOW_ALLOW_FILE_STORE=true``
    (its documented opt-out, set here for this process if unset): the
    point is a store that needs no database and no server.
    """
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    store.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=store.resolve().as_uri())


def _params(config: dict[str, Any]) -> list[Any]:
    from mlflow.entities import Param

    return [Param(key, str(value)[:6000]) for key, value in sorted(config.items())]


def _millis() -> int:
    import time

    return int(time.time() * 1000)


def open_tracker(settings: Settings) -> Tracker | None:
    """The tracker ``settings.tracking`` names, writing into ``settings.run_dir``; or None."""
    run_dir = Path(settings.run_dir)
    if settings.tracking == "tensorboard":
        return TensorBoardTracker(settings, run_dir)
    if settings.tracking == "mlflow":
        return MlflowTracker(settings, run_dir)
    return None
