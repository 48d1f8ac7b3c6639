"""Model selection on the hospitals' validation splits, federated.

In the rounds ``selection.every`` asks for (and the last), each hospital
scores the global model on its own validation split and sends the figures
under ``val-`` names; the evaluation's aggregate weights them by the
hospitals' validation examples. :class:`Selection` keeps the global model
whose ``val-<selection.metric>`` is best (lowest for ``loss``/``hd95``,
highest otherwise; a tie keeps the earlier round), written atomically as
``best_model.pt``, and says when ``selection.patience`` validated rounds
have passed without improvement. Its state, the selected weights included,
travels in the checkpoint (:data:`STATE_KEY`), so a resumed run keeps the
best so far; a checkpoint without it starts selection afresh.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from common import wire
from common.config import SelectionConfig
from server.checkpoint import atomic_save
from server.round_report import SelectionStep

BEST_MODEL = "best_model.pt"
STATE_KEY = "selection"
"""Checkpoint strategy-state key of the selection so far."""


class EarlyStop(Exception):  # noqa: N818 - a signal, not an error
    """Raised after a round when ``selection.patience`` validated rounds brought no improvement."""


@dataclass
class Selection:
    """The best validated global model so far.

    Attributes:
        config: the ``selection`` settings.
        best_round: the selected round (0: none validated yet).
        best_value: its ``val-<metric>``.
        best_loss: its weighted validation loss (None if not reported).
        stale: validated rounds since the selected one.
        last: the latest validated round's ``round``, value and ``val-loss``.
        weights: the selected global model (CPU tensors).
    """

    config: SelectionConfig
    best_round: int = 0
    best_value: float = math.nan
    best_loss: float | None = None
    stale: int = 0
    last: dict[str, float | None] = field(default_factory=dict)
    weights: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """The aggregate's metric key (``val-loss``, ``val-auc``...)."""
        return wire.VALIDATION_PREFIX + self.config.metric

    @property
    def exhausted(self) -> bool:
        """Whether ``selection.patience`` validated rounds passed without improvement."""
        return self.config.patience > 0 and self.stale >= self.config.patience

    def _better(self, value: float) -> bool:
        if self.best_round == 0:
            return True
        return value < self.best_value if self.config.minimise else value > self.best_value

    def observe(self, round_: int, overall: dict[str, Any],
                weights: dict[str, torch.Tensor]) -> SelectionStep | None:
        """Judge round ``round_``'s global model by its aggregated evaluation.

        Returns:
            The step, or None when the hospitals sent no validation figure.
        """
        value = overall.get(self.key)
        if value is None or not math.isfinite(float(value)):
            return None
        loss = overall.get(wire.VALIDATION_PREFIX + "loss")
        self.last = {"round": float(round_), "value": float(value),
                     "val-loss": None if loss is None else float(loss)}
        if self._better(float(value)):
            self.best_round, self.best_value, self.stale = round_, float(value), 0
            self.best_loss = None if loss is None else float(loss)
            self.weights = {k: v.detach().cpu().clone() for k, v in weights.items()}
        else:
            self.stale += 1
        return SelectionStep(self.config.metric, float(value), self.best_round,
                             self.best_value, self.stale)

    def save_best(self, run_dir: Path) -> None:
        """Write the selected model to ``run_dir/best_model.pt`` (atomically), if any."""
        if self.weights:
            atomic_save(self.weights, run_dir / BEST_MODEL)

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps of the selection (plain values and tensors)."""
        return {"best_round": self.best_round, "best_value": self.best_value,
                "best_loss": self.best_loss, "stale": self.stale, "last": dict(self.last),
                "weights": self.weights}

    @classmethod
    def restored(cls, config: SelectionConfig, state: dict[str, Any] | None) -> Selection:
        """The selection saved in a checkpoint (a fresh one for an older checkpoint)."""
        if not state:
            return cls(config)
        return cls(config, best_round=int(state["best_round"]),
                   best_value=float(state["best_value"]), best_loss=state["best_loss"],
                   stale=int(state["stale"]), last=dict(state["last"]),
                   weights=dict(state["weights"]))

    def summary(self, *, stopped_early: bool) -> dict[str, Any]:
        """``summary.json``'s ``selection``: which round was selected and why."""
        if self.best_round == 0:
            return {"round": None, "metric": self.key,
                    "reason": "no hospital reported validation metrics; the last round's "
                              "model is reported"}
        last_loss, gap = self.last.get("val-loss"), None
        if last_loss is not None and self.best_loss is not None:
            gap = last_loss - self.best_loss
        direction = "lowest" if self.config.minimise else "highest"
        return {
            "round": self.best_round, "metric": self.key, "value": self.best_value,
            "reason": f"{direction} {self.key} over the hospitals' validation splits "
                      f"(weighted by val-num-examples) of the rounds validated",
            "last_validated_round": int(self.last["round"] or 0),
            "last_value": self.last.get("value"),
            "val_loss": self.best_loss, "last_val_loss": last_loss,
            "val_loss_gap": gap, "stopped_early": stopped_early,
            "patience": self.config.patience, "every": self.config.every,
        }
