"""The ServerApp at the coordinating site: Flower's strategy loop plus MedFed's run folder.

Steps: read the validated settings from the run config, build (or restore)
the global model, run the configured Flower strategy for the planned rounds
(each phase waiting at most ``federation.round_timeout_s``), and after every
round write its report (:mod:`server.round_end`: metrics rows, central
evaluation, model selection, checkpoint, progress line); at the end save the
final model and ``summary.json`` (test metrics of the validation-selected
model, ``best_model.pt``) and print which round was selected.
"""

from __future__ import annotations

# First of all: MONAI imported once, whole, before another thread can race it
# (Flower's simulation process imports the ServerApp and the ClientApp at once)
import common.monai_first  # noqa: F401  # isort: skip

import time
import traceback
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from common import wire
from common.config import Settings, settings_from_json
from common.export import export_run
from common.logs import medfed_logger
from common.models import check_dp_trainable
from server.central import central_evaluator
from server.checkpoint import (
    FINAL_MODEL,
    Checkpoint,
    atomic_save,
    load_checkpoint,
    restore_strategy_state,
)
from server.client_dp import RELEASES, Release, wrap_client_level
from server.clinical import clinical_summary
from server.initial_model import initial_model
from server.personalisation import extend_summary, personalise
from server.prompt_grid import PromptGrid, simulation_window
from server.report import ERROR_FILE, RunRecorder
from server.round_end import RoundEnd
from server.run_report import write_report_safely
from server.selection import BEST_MODEL, STATE_KEY, EarlyStop, Selection
from server.strategy import build_strategy
from server.tracking import open_tracker

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
    """Run the whole federated training; returns the summary written to the run folder.

    Flower's ``Strategy.start`` runs the rounds; after each one it calls
    :class:`~server.round_end.RoundEnd`, which writes the round's report
    and checkpoint, and may stop the run early (model selection).
    """
    started = time.perf_counter()
    run_dir = Path(settings.run_dir)
    rounds = settings.federation.rounds
    recorder = RunRecorder(run_dir, settings.task.kind, rounds, hospital_names(settings),
                           tracker=open_tracker(settings))

    # Initial global model (checked trainable with DP-SGD before any hospital
    # starts), or the last completed round of an interrupted run
    model, transfer = initial_model(settings, run_dir)  # model.init_weights, fresh runs only
    if settings.privacy.mode == "dp_sgd":
        check_dp_trainable(model, (settings.task.in_channels, *settings.task.image_size))
    weights = model.state_dict()
    checkpoint = load_checkpoint(run_dir) if settings.resume else None
    done = 0
    if checkpoint is not None:
        done, weights = checkpoint.round, checkpoint.weights
        log.info("[MedFed] resuming after round %d of %d from %s", done, rounds, run_dir)

    # The checked Flower strategy (inside client-level DP's wrapper, if on),
    # restored to where a resumed run stopped
    checked = build_strategy(settings, recorder, round_offset=done)
    saved = checkpoint.strategy_state if checkpoint is not None else {}
    restore_strategy_state(checked.strategy, saved)
    strategy = (wrap_client_level(checked, settings, earlier_releases(checkpoint))
                if settings.privacy.mode == "client_level" else checked)
    selection = Selection.restored(settings.selection, saved.get(STATE_KEY))
    selection.save_best(run_dir)  # a resumed run's best_model.pt is its checkpoint's
    round_end = RoundEnd(settings, checked, strategy, recorder, selection,
                         central_evaluator(settings), weights=dict(weights), last_round=done)

    stopped_early = selection.exhausted
    if done < rounds and not stopped_early:
        try:
            strategy.start(
                grid=PromptGrid(grid, name_of=checked.hospital_of_node,
                                window=simulation_window(grid, settings),
                                resend=checked.resend),
                initial_arrays=ArrayRecord(weights),
                num_rounds=rounds - done,
                timeout=settings.federation.round_timeout_s,
                train_config=ConfigRecord({"local-epochs": settings.federation.local_epochs}),
                evaluate_fn=round_end,
            )
        except EarlyStop as stop:
            log.info("[MedFed] stopping early after round %d: %s", round_end.last_round, stop)
            stopped_early = True
    summary = finish(settings, recorder, round_end, stopped_early=stopped_early,
                     wall_time_s=time.perf_counter() - started)
    summary = extend_summary(run_dir, summary, transfer=transfer, personalised=personalise(
        PromptGrid(grid), settings, round_end.weights, recorder))
    export_run(run_dir, settings, round_end.weights, summary.get("threshold"))  # RUN_DIR/model
    recorder.close_tracker()
    write_report_safely(run_dir)  # report.html (a failure is only a warning)
    return summary


def finish(settings: Settings, recorder: RunRecorder, round_end: RoundEnd, *,
           stopped_early: bool, wall_time_s: float) -> dict:
    """Save the final model, write ``summary.json`` and print which model was selected."""
    run_dir = Path(settings.run_dir)
    atomic_save(round_end.weights, run_dir / FINAL_MODEL)
    selection = round_end.selection.summary(stopped_early=stopped_early)
    summary = recorder.write_summary(experiment=settings.name, rounds=round_end.last_round,
                                     wall_time_s=wall_time_s, selection=selection)
    best = run_dir / BEST_MODEL
    chosen = (torch.load(best, map_location="cpu", weights_only=True) if best.is_file()
              else round_end.weights)
    summary = clinical_summary(settings, summary, chosen)  # threshold, intervals, central
    if "threshold" in summary:
        log.info("[MedFed] decision threshold %.2f (%s, %s)", summary["threshold"]["value"],
                 summary["threshold"]["method"], summary["threshold"]["chosen_on"])
    log.info("[MedFed] finished %d of %d rounds; run folder: %s", round_end.last_round,
             settings.federation.rounds, run_dir)
    if selection["round"] is not None:
        gap = selection["val_loss_gap"]
        log.info("[MedFed] selected round %d: %s %.4f (last validated round %d: %.4f); "
                 "validation loss gap last - selected %s; best_model.pt", selection["round"],
                 selection["metric"], selection["value"], selection["last_validated_round"],
                 selection["last_value"], "n/a" if gap is None else f"{gap:+.4f}")
    else:
        log.info("[MedFed] no validation metrics: %s", selection["reason"])
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
