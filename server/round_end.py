"""The end of every round: one function gathers the round's report and writes it.

Flower's ``Strategy.start`` calls its ``evaluate_fn`` after each round's
train and evaluate phases; MedFed's is :class:`RoundEnd`. It

1. completes the :class:`~server.round_report.RoundReport` the checked
   strategy began (train, evaluate) with the central scores, the
   client-level DP figures and the model selection step;
2. writes it: the rows in ``metrics.jsonl``, ``best_model.pt`` when the
   round improved on validation, ``checkpoint.pt`` (model, strategy state,
   DP releases, selection), then the ``round`` row and progress line;
3. raises :class:`~server.selection.EarlyStop` once ``selection.patience``
   validated rounds brought no improvement.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, MetricRecord

from common import wire
from common.config import Settings
from server.central import CentralEval
from server.checkpoint import Checkpoint, save_checkpoint, strategy_state
from server.client_dp import RELEASES, client_level_epsilon
from server.report import RunRecorder
from server.round_report import RoundReport
from server.selection import STATE_KEY, EarlyStop, Selection
from server.strategy import CheckedStrategy


@dataclass
class RoundEnd:
    """Flower's ``evaluate_fn``: see the module docstring.

    Attributes:
        settings: the run's settings.
        checked: the checked strategy (phases, round offset, strategy state).
        strategy: what ``start`` runs: ``checked``, or the client-level DP
            wrapper around it (its ``releases``).
        recorder: the run folder.
        selection: the best validated model so far.
        central: the central test-set evaluator, if any.
        weights: the latest global model (the final model, even after an early stop).
        last_round: the last round completed (true number).
    """

    settings: Settings
    checked: CheckedStrategy
    strategy: Any
    recorder: RunRecorder
    selection: Selection
    central: CentralEval | None
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    last_round: int = 0

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Close round ``server_round`` (Flower's count; 0 = before training: nothing)."""
        if server_round == 0:
            return None
        self.weights = arrays.to_torch_state_dict()
        report = self.report(server_round)
        self.write(report)
        self.last_round = report.round
        if self.selection.exhausted:
            raise EarlyStop(f"no better validation {self.selection.key} in "
                            f"selection.patience={self.settings.selection.patience} validated "
                            f"rounds after round {self.selection.best_round}")
        return wire.metric_record(report.central) if report.central is not None else None

    def report(self, server_round: int) -> RoundReport:
        """The round's report: the strategy's phases plus what the server adds."""
        report = self.checked.take_report(server_round)
        central = self.central(self.weights) if self.central is not None else None
        privacy = None
        if self.settings.privacy.mode == "client_level":
            privacy = client_level_epsilon(self.settings, self.strategy.releases)
        step = None
        if report.evaluate is not None:
            step = self.selection.observe(report.round, report.evaluate.overall, self.weights)
        return dataclasses.replace(report, central=central, client_privacy=privacy,
                                   selection=step)

    def write(self, report: RoundReport) -> None:
        """Rows, best model, checkpoint, then the round row and progress line."""
        run_dir = Path(self.settings.run_dir)
        self.recorder.write_rows(report)
        if report.selection is not None and report.selection.best_round == report.round:
            self.selection.save_best(run_dir)
        saved = strategy_state(self.checked.strategy)
        if self.settings.privacy.mode == "client_level":
            saved[RELEASES] = list(self.strategy.releases)
        saved[STATE_KEY] = self.selection.state()
        save_checkpoint(run_dir, Checkpoint(report.round, self.weights, saved))
        self.recorder.end_round(report)
