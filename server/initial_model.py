"""The global model before round 1: built from the config, optionally from a weights file.

:func:`initial_model` builds the configured network from the run's seed and,
for a fresh run with ``model.init_weights``, loads the file's matching
tensors (:mod:`common.transfer`), logs what matched and writes the report to
``RUN_DIR/transfer.json``. A resumed run (``resume=true`` with a checkpoint
file in the run folder) continues from its checkpoint: the file is not read
again and never overrides trained weights. ``model.freeze`` and
``personalise.freeze`` patterns are checked against the network here, so a
typo fails the run before any hospital trains.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from common.config import Settings
from common.logs import medfed_logger
from common.models import build_model
from common.transfer import TransferReport, init_from_file, matching_parameters
from server.checkpoint import CHECKPOINT, NEXT, PREVIOUS
from server.report import atomic_write_text

TRANSFER_FILE = "transfer.json"

log = medfed_logger()


def initial_model(settings: Settings, run_dir: Path) -> tuple[nn.Module, TransferReport | None]:
    """The global model of round 1 and, when initialised from a file, the transfer report.

    Raises:
        common.transfer.TransferError: the weights file is missing,
            unreadable or matches nothing, or a freeze pattern names no
            parameter (the message names the file or key).
    """
    model = build_model(settings.task, settings.model, seed=settings.seed)
    for key, patterns in (("model.freeze", settings.model.freeze),
                          ("personalise.freeze", settings.personalise.freeze)):
        if patterns:
            matching_parameters(model, patterns, key)
    source = settings.model.init_weights
    if not source:
        return model, None
    if settings.resume and any((run_dir / name).exists() for name in (CHECKPOINT, NEXT, PREVIOUS)):
        log.info("[MedFed] resuming: model.init_weights=%s is not applied (the checkpoint's "
                 "weights continue)", source)
        return model, None
    report = init_from_file(model, Path(source))
    log.info("[MedFed] model.init_weights: %s", report.line())
    atomic_write_text(run_dir / TRANSFER_FILE, json.dumps(report.to_json(), indent=2) + "\n")
    return model, report
