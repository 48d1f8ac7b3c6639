"""What one federated round produced, as values: one per phase, one per round.

The round's phases each produce one value: the checked strategy
(:class:`server.strategy.CheckedStrategy`) a :class:`PhaseReport` for
``train`` and one for ``evaluate``; the ServerApp's end-of-round function
the central scores, the client-level privacy figures and the model
selection step. They are gathered into one :class:`RoundReport`, which
:meth:`server.report.RunRecorder.write_round` writes (``metrics.jsonl``
rows and the progress line) beside the checkpoint.

Dropped or bounded replies are not part of these values: they are written
the moment they are found (:meth:`server.report.RunRecorder.failure`), so
a round that fails still leaves them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PhaseReport:
    """The sound replies of one phase and their aggregate.

    Attributes:
        phase: ``train`` or ``evaluate``.
        replies: each sound reply's metrics (with its ``hospital`` index).
        overall: the aggregated metrics.
    """

    phase: str
    replies: tuple[dict[str, Any], ...]
    overall: dict[str, Any]


@dataclass(frozen=True)
class SelectionStep:
    """Model selection after one round (see :mod:`server.selection`).

    Attributes:
        metric: the validation metric's plain name (``loss``, ``auc``...).
        value: its weighted value over the hospitals this round.
        best_round: the selected round so far (this one if it improved).
        best_value: the selected round's value.
        stale: validated rounds since the selected one.
    """

    metric: str
    value: float
    best_round: int
    best_value: float
    stale: int


@dataclass(frozen=True)
class RoundReport:
    """Everything a completed round produced (1-based true round number).

    Attributes:
        round: the round, counted over a resumed run's earlier rounds too.
        train: the training phase (None if the strategy aggregated none).
        evaluate: the federated evaluation (None when no hospital evaluated).
        central: the server's scores on the central test set, if any.
        client_privacy: client-level DP figures after this round, if any.
        selection: the model selection step, when hospitals validated.
    """

    round: int
    train: PhaseReport | None = None
    evaluate: PhaseReport | None = None
    central: dict[str, float] | None = None
    client_privacy: dict[str, float] | None = None
    selection: SelectionStep | None = None
