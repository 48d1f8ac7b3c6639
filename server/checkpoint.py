"""Checkpoints of the global model and strategy state, written atomically.

``checkpoint.pt`` in the run folder always holds the last completed round:
it is written to a temporary file in the same folder, flushed to disk and
moved into place with :func:`os.replace`, so a crash mid-write leaves the
previous checkpoint intact.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord

from common.atomic import atomic_file

CHECKPOINT = "checkpoint.pt"
FINAL_MODEL = "final_model.pt"

# Attributes of Flower's strategies that carry state between rounds
# (FedOpt family: current weights and moments; FedAvgM: momentum).
STATE_ATTRIBUTES = ("current_arrays", "m_t", "v_t", "momentum_vector")


@dataclass
class Checkpoint:
    """The state after a completed round.

    Attributes:
        round: last completed round (1-based).
        weights: global model state dict.
        strategy_state: the strategy's round-to-round state (see
            :data:`STATE_ATTRIBUTES`), as tensors.
    """

    round: int
    weights: dict[str, torch.Tensor]
    strategy_state: dict[str, Any]


def atomic_save(obj: object, path: Path) -> None:
    """``torch.save`` to ``path`` via a temporary file and ``os.replace``."""
    with atomic_file(path) as handle:
        torch.save(obj, handle)


def _to_tensors(value: Any) -> Any:
    if isinstance(value, ArrayRecord):
        return {"__arrayrecord__": value.to_torch_state_dict()}
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, dict):
        return {k: _to_tensors(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_tensors(v) for v in value]
    return value


def _from_tensors(value: Any) -> Any:
    if isinstance(value, dict) and "__arrayrecord__" in value:
        return ArrayRecord(value["__arrayrecord__"])
    if isinstance(value, torch.Tensor):
        return value.numpy()
    if isinstance(value, dict):
        return {k: _from_tensors(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_tensors(v) for v in value]
    return value


def strategy_state(strategy: object) -> dict[str, Any]:
    """Round-to-round state of a Flower strategy, as tensors."""
    return {name: _to_tensors(getattr(strategy, name)) for name in STATE_ATTRIBUTES
            if getattr(strategy, name, None) is not None}


def restore_strategy_state(strategy: object, state: dict[str, Any]) -> None:
    """Put state saved by :func:`strategy_state` back into ``strategy``.

    Keys other than :data:`STATE_ATTRIBUTES` (state of a wrapper around the
    strategy, such as client-level DP's releases) are left to their owner.
    """
    for name, value in state.items():
        if name in STATE_ATTRIBUTES:
            setattr(strategy, name, _from_tensors(value))


def save_checkpoint(run_dir: Path, checkpoint: Checkpoint) -> None:
    """Write ``run_dir/checkpoint.pt`` atomically."""
    atomic_save({"round": checkpoint.round, "weights": checkpoint.weights,
                 "strategy_state": checkpoint.strategy_state}, run_dir / CHECKPOINT)


def load_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The last completed round's checkpoint in ``run_dir``, or None if there is none.

    Raises:
        ValueError: the file exists but cannot be read (names it).
    """
    path = run_dir / CHECKPOINT
    if not path.exists():
        return None
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
        return Checkpoint(round=int(raw["round"]), weights=raw["weights"],
                          strategy_state=raw["strategy_state"])
    except Exception as err:  # noqa: BLE001 - any read failure is reported the same way
        raise ValueError(f"cannot read checkpoint {path}: {err}") from err
