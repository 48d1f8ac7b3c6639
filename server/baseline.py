"""Centralized baseline: the same model, optimizer and epoch budget on pooled data.

    python -m server.baseline experiment=pneumonia

Pools every hospital's training split (what federated learning avoids),
trains for ``federation.rounds x federation.local_epochs`` epochs, and scores
the result exactly as a federated run is scored: per hospital test split,
weighted overall and the central test set. Model selection is the federated
run's too: after every ``federation.local_epochs`` epochs (one round's worth,
in the rounds ``selection.every`` asks for, and the last) the model is scored
on the pooled validation splits, the best by ``val-<selection.metric>`` is
kept as ``best_model.pt`` (``final_model.pt`` is the last epoch's), training
stops after ``selection.patience`` validations without improvement, and the
test figures are the selected model's. Writes ``summary.json`` (same metric
names, ``selection`` included) into ``runs/<name>-central-<time>`` or ``run_dir``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from common import wire
from common.augment import augmented
from common.compose import compose_settings, finalize, settings_yaml
from common.config import ConfigError, Settings
from common.data import load_central_test, load_pooled, load_site
from common.evaluation import evaluate
from common.export import export_run
from common.intervals import Bootstrap, overall_intervals
from common.logs import medfed_logger
from common.models import build_model
from common.schedule import epoch_lr, set_lr
from common.training import loss_class_weights, make_optimizer, resolve_device, train_epochs
from server.app import hospital_names
from server.clinical import bootstrap_of, finite, intervals_note, two_classes
from server.report import SUMMARY_FILE, atomic_write_text
from server.run_report import write_report_safely
from server.selection import EarlyStop, Selection
from server.summary_table import print_summary
from server.threshold import Threshold, at_threshold, choose, grid_index, without_counts

log = medfed_logger()


def score_everywhere(model: torch.nn.Module, settings: Settings, device: torch.device, *,
                     threshold: float | None = None) -> dict[str, Any]:
    """Score ``model`` on each hospital's test split, overall and centrally, with intervals.

    Args:
        threshold: two classes: the probability of class 1 from which it is predicted
            (None: 0.5).

    Returns:
        ``{"hospitals": {name: metrics}, "overall": metrics, "central": metrics}``;
        ``overall`` averages hospitals weighted by their test sizes (intervals as
        :mod:`server.clinical` describes).
    """
    batch = max(64, settings.data.batch_size)
    boot = bootstrap_of(settings)
    hospitals: dict[str, dict[str, Any]] = {}
    for index, name in enumerate(hospital_names(settings)):
        test = load_site(settings, index).test
        hospitals[name] = evaluate(model, DataLoader(test, batch_size=batch),
                                   task=settings.task, device=device, threshold=threshold,
                                   boot=Bootstrap(boot.resamples, boot.confidence,
                                                  seed=boot.seed + index), roc=True)
    total = sum(m["num-examples"] for m in hospitals.values())
    keys = set.intersection(*(set(m) for m in hospitals.values())) - {"num-examples"}
    keys -= wire.INTERVAL_METRICS | wire.ROC_LISTS
    overall = {k: sum(m[k] * m["num-examples"] for m in hospitals.values()) / total
               for k in sorted(keys)}
    overall["num-examples"] = total
    overall.update(overall_intervals(list(hospitals.values()), "num-examples"))
    if threshold is not None:
        chosen = Threshold(threshold, grid_index(threshold), "given", "")
        hospitals, overall = at_threshold(hospitals, overall, chosen, boot)
    central_set = load_central_test(settings) if settings.data.central_test else None
    central = ({} if central_set is None else
               evaluate(model, DataLoader(central_set, batch_size=batch), task=settings.task,
                        device=device, boot=boot, threshold=threshold))
    if central and threshold is not None:
        central["threshold"] = threshold
    return finite({"hospitals": {n: without_counts(m) for n, m in hospitals.items()},
                   "overall": without_counts(overall), "central": central})


def validation_threshold(model: torch.nn.Module, loader: DataLoader, settings: Settings,
                         device: torch.device, round_: int | None) -> Threshold | None:
    """The threshold chosen on the pooled validation splits (two classes only)."""
    if not two_classes(settings):
        return None
    val = evaluate(model, loader, task=settings.task, device=device, roc=True)
    where = "pooled validation splits (centralized" + (
        f", round {round_})" if round_ is not None else ")")
    return choose(val[wire.ROC_TP], val[wire.ROC_FP], settings.evaluation, where)


def validate(model: torch.nn.Module, loader: DataLoader, settings: Settings,
             selection: Selection, *, epoch: int, device: torch.device) -> None:
    """Score the model on the pooled validation splits after each round's worth of epochs.

    Epoch ``epoch`` ends round ``epoch / local_epochs`` when that divides; the
    rounds validated are those a federated run validates (every
    ``selection.every``-th and the last).

    Raises:
        EarlyStop: ``selection.patience`` validations brought no improvement.
    """
    fed = settings.federation
    if epoch % fed.local_epochs:
        return
    round_ = epoch // fed.local_epochs
    if round_ % settings.selection.every and round_ != fed.rounds:
        return
    metrics = evaluate(model, loader, task=settings.task, device=device)
    figures = {wire.VALIDATION_PREFIX + key: value for key, value in metrics.items()}
    step = selection.observe(round_, figures, model.state_dict())
    if step is not None:
        log.info("[MedFed] centralized round %d | val-%s %.4f | best round %d", round_,
                 step.metric, step.value, step.best_round)
    if selection.exhausted:
        raise EarlyStop
    model.train()


def train_centralized(settings: Settings) -> dict[str, Any]:
    """Train on the pooled training data and write the run folder's summary."""
    started = time.perf_counter()
    run_dir = Path(settings.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(settings_yaml(settings))
    device = resolve_device(settings.train.device)
    model = build_model(settings.task, settings.model, seed=settings.seed).to(device)
    optimizer = make_optimizer(model, settings.train)
    pooled = load_pooled(settings)
    # The same augmentation, class weighting and lr curve as the hospitals use
    weighting = loss_class_weights(settings.train, settings.task, pooled.train)
    train = augmented(pooled.train, settings.augment, settings.task, seed=settings.seed)
    loader = DataLoader(train, batch_size=settings.data.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(settings.seed))
    fed = settings.federation
    epochs = fed.rounds * fed.local_epochs
    selection = Selection(settings.selection)
    val_loader = DataLoader(pooled.val, batch_size=max(64, settings.data.batch_size))
    stopped_early = False
    for epoch in range(1, epochs + 1):
        lr = epoch_lr(settings.train, epoch, local_epochs=fed.local_epochs, rounds=fed.rounds)
        set_lr(optimizer, lr)
        result = train_epochs(model, loader, optimizer, task=settings.task, epochs=1,
                              device=device, amp=settings.train.amp, class_weights=weighting)
        log.info("[MedFed] centralized epoch %d/%d | lr %.2e | train loss %.4f", epoch, epochs,
                 lr, result.loss)
        try:
            validate(model, val_loader, settings, selection, epoch=epoch, device=device)
        except EarlyStop:
            stopped_early = True
            break
    train_seconds = time.perf_counter() - started
    torch.save(model.state_dict(), run_dir / "final_model.pt")
    selection.save_best(run_dir)
    if selection.weights:
        model.load_state_dict(selection.weights)
    chosen = selection.summary(stopped_early=stopped_early)
    threshold = validation_threshold(model, val_loader, settings, device, chosen.get("round"))
    summary = {"experiment": f"{settings.name} (centralized)", "task": settings.task.kind,
               "rounds": epochs, "epochs_trained": epoch, "selection": chosen,
               **({} if threshold is None else {"threshold": threshold.to_json()}),
               "intervals": intervals_note(settings),
               **score_everywhere(model, settings, device,
                                  threshold=None if threshold is None else threshold.value),
               "wall_time_s": round(time.perf_counter() - started, 2),
               "train_time_s": round(train_seconds, 2)}
    atomic_write_text(run_dir / SUMMARY_FILE, json.dumps(summary, indent=2))
    export_run(run_dir, settings, model.state_dict(), summary.get("threshold"))  # RUN_DIR/model
    write_report_safely(run_dir)  # report.html (a failure is only a warning)
    return summary


def main(argv: list[str]) -> int:
    """Command line: Hydra overrides in, exit code out."""
    try:
        settings = compose_settings(argv)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    settings = finalize(settings, base=Path.cwd(), suffix="-central")
    summary = train_centralized(settings)
    print_summary(summary, run_dir=Path(settings.run_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
