"""The ServerApp at the coordinating site: Flower's strategy loop plus MedFed's run folder.

Steps: read the validated settings from the run config, build (or restore)
the global model, run the configured Flower strategy for the planned rounds,
and after every round evaluate centrally, checkpoint atomically and print a
progress line; at the end save the final model and ``summary.json``.
"""

from __future__ import annotations

import time
import traceback
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from common import wire
from common.config import Settings, settings_from_json
from common.logs import medfed_logger
from common.models import build_model, check_dp_trainable
from server.central import central_evaluator
from server.checkpoint import (
    FINAL_MODEL,
    Checkpoint,
    atomic_save,
    load_checkpoint,
    restore_strategy_state,
    save_checkpoint,
    strategy_state,
)
from server.client_dp import RELEASES, Release, client_level_epsilon, wrap_client_level
from server.prompt_grid import PromptGrid
from server.report import RunRecorder
from server.strategy import build_strategy

ERROR_FILE = "error.txt"

app = ServerApp()
log = medfed_logger()


def hospital_names(settings: Settings) -> list[str]:
    """Display names: site folder names for a natural split, else ``hospital-i``."""
    count = settings.federation.num_hospitals
    if settings.data.split == "natural" and settings.data.path:
        root = Path(settings.data.path)
        if root.is_dir():
            names = sorted(p.name for p in root.iterdir() if p.is_dir())
            if len(names) == count:
                return names
    return [f"hospital-{i}" for i in range(count)]


def earlier_releases(checkpoint: Checkpoint | None) -> list[Release]:
    """Client-level DP releases recorded in a resumed run's checkpoint.

    Raises:
        ValueError: the checkpoint has completed rounds but no record of them
            (written by an older MedFed), so epsilon cannot be accounted.
    """
    if checkpoint is None:
        return []
    if RELEASES not in checkpoint.strategy_state:
        raise ValueError(
            f"checkpoint after round {checkpoint.round} has no record of its client-level DP "
            "releases (written by an older MedFed): epsilon cannot be accounted; start a new "
            "run folder instead of resume=true")
    return list(checkpoint.strategy_state[RELEASES])


def run(grid: Grid, settings: Settings) -> dict:
    """Run the whole federated training; returns the summary written to the run folder."""
    started = time.perf_counter()
    run_dir = Path(settings.run_dir)
    rounds = settings.federation.rounds
    recorder = RunRecorder(run_dir, settings.task.kind, rounds, hospital_names(settings))

    # Initial global model (checked trainable with DP-SGD before any hospital
    # starts), or the last completed round of an interrupted run
    model = build_model(settings.task, settings.model, seed=settings.seed)
    if settings.privacy.mode == "dp_sgd":
        check_dp_trainable(model, (settings.task.in_channels, *settings.task.image_size))
    weights = model.state_dict()
    checkpoint = load_checkpoint(run_dir) if settings.resume else None
    done = 0
    if checkpoint is not None:
        done, weights = checkpoint.round, checkpoint.weights
        log.info("[MedFed] resuming after round %d of %d from %s", done, rounds, run_dir)
    inner = build_strategy(settings, recorder, round_offset=done)
    if checkpoint is not None:
        restore_strategy_state(inner, checkpoint.strategy_state)
    client_level = settings.privacy.mode == "client_level"
    strategy = (wrap_client_level(inner, settings, earlier_releases(checkpoint))
                if client_level else inner)

    central = central_evaluator(settings)

    def end_of_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Called by Flower after each round: central eval, checkpoint, progress."""
        if server_round == 0:
            return None
        true_round = server_round + done
        state = arrays.to_torch_state_dict()
        metrics = None
        if central is not None:
            scores = central(state)
            recorder.record_central(true_round, scores)
            metrics = wire.metric_record(scores)
        saved = strategy_state(inner)
        if client_level:
            recorder.record_client_privacy(true_round,
                                           client_level_epsilon(settings, strategy.releases))
            saved[RELEASES] = list(strategy.releases)
        save_checkpoint(run_dir, Checkpoint(true_round, state, saved))
        recorder.end_round(true_round)
        return metrics

    if done < rounds:
        result = strategy.start(
            grid=PromptGrid(grid),
            initial_arrays=ArrayRecord(weights),
            num_rounds=rounds - done,
            train_config=ConfigRecord({"local-epochs": settings.federation.local_epochs}),
            evaluate_fn=end_of_round,
        )
        weights = result.arrays.to_torch_state_dict()

    # Final model and summary
    atomic_save(weights, run_dir / FINAL_MODEL)
    summary = recorder.write_summary(experiment=settings.name, rounds=rounds,
                                     wall_time_s=time.perf_counter() - started)
    log.info("[MedFed] finished %d rounds; run folder: %s", rounds, run_dir)
    return summary


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point Flower calls at the coordinating site."""
    settings = settings_from_json(str(context.run_config[wire.RUN_CONFIG_KEY]))
    try:
        run(grid, settings)
    except BaseException as err:
        error_path = Path(settings.run_dir) / ERROR_FILE
        error_path.parent.mkdir(parents=True, exist_ok=True)
        error_path.write_text(f"{type(err).__name__}: {err}\n\n{traceback.format_exc()}")
        raise
