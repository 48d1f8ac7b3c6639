"""Centralized baseline: the same model, optimizer and epoch budget on pooled data.

    python -m server.baseline experiment=pneumonia

Pools every hospital's training split (what federated learning avoids),
trains for ``federation.rounds x federation.local_epochs`` epochs, and scores
the result exactly as a federated run is scored: per hospital test split,
weighted overall and the central test set. Writes ``summary.json`` (same
metric names) into ``runs/<name>-central-<time>`` or ``run_dir``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from common.augment import augmented
from common.compose import compose_settings, finalize, settings_yaml
from common.config import ConfigError, Settings
from common.data import load_central_test, load_pooled, load_site
from common.evaluation import evaluate
from common.logs import medfed_logger
from common.models import build_model
from common.schedule import epoch_lr, set_lr
from common.training import loss_class_weights, make_optimizer, resolve_device, train_epochs
from server.app import hospital_names
from server.report import SUMMARY_FILE, atomic_write_text
from server.summary_table import print_summary

log = medfed_logger()


def score_everywhere(model: torch.nn.Module, settings: Settings, device: torch.device
                     ) -> dict[str, Any]:
    """Score ``model`` on each hospital's test split, overall and centrally.

    Returns:
        ``{"hospitals": {name: metrics}, "overall": metrics, "central": metrics}``;
        ``overall`` averages hospitals weighted by their test sizes.
    """
    batch = max(64, settings.data.batch_size)
    hospitals: dict[str, dict[str, float]] = {}
    for index, name in enumerate(hospital_names(settings)):
        test = load_site(settings, index).test
        hospitals[name] = evaluate(model, DataLoader(test, batch_size=batch),
                                   task=settings.task, device=device)
    total = sum(m["num-examples"] for m in hospitals.values())
    keys = set.intersection(*(set(m) for m in hospitals.values())) - {"num-examples"}
    overall = {k: sum(m[k] * m["num-examples"] for m in hospitals.values()) / total
               for k in sorted(keys)}
    overall["num-examples"] = total
    central_set = load_central_test(settings) if settings.data.central_test else None
    central = ({} if central_set is None else
               evaluate(model, DataLoader(central_set, batch_size=batch),
                        task=settings.task, device=device))
    return {"hospitals": hospitals, "overall": overall, "central": central}


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
    for epoch in range(1, epochs + 1):
        lr = epoch_lr(settings.train, epoch, local_epochs=fed.local_epochs, rounds=fed.rounds)
        set_lr(optimizer, lr)
        result = train_epochs(model, loader, optimizer, task=settings.task, epochs=1,
                              device=device, amp=settings.train.amp, class_weights=weighting)
        log.info("[MedFed] centralized epoch %d/%d | lr %.2e | train loss %.4f", epoch, epochs,
                 lr, result.loss)
    train_seconds = time.perf_counter() - started
    torch.save(model.state_dict(), run_dir / "final_model.pt")
    summary = {"experiment": f"{settings.name} (centralized)", "task": settings.task.kind,
               "rounds": epochs, **score_everywhere(model, settings, device),
               "wall_time_s": round(time.perf_counter() - started, 2),
               "train_time_s": round(train_seconds, 2)}
    atomic_write_text(run_dir / SUMMARY_FILE, json.dumps(summary, indent=2))
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
