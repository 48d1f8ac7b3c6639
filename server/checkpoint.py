"""Checkpoints of the global model and strategy state, written atomically, two kept.

``checkpoint.pt`` in the run folder holds the last completed round and
``checkpoint-prev.pt`` the round before. A round's checkpoint is first
written completely (``checkpoint-next.pt``, flushed to disk), then the
latest is renamed to ``checkpoint-prev.pt`` and the new one to
``checkpoint.pt`` (:func:`os.replace`): at every instant the folder holds a
complete checkpoint of the last or the one-before-last round. On resume a
damaged latest checkpoint (a truncated file, say) falls back to the one
before it, with a warning that says so, and the rows of rounds after the one
restored are dropped from ``metrics.jsonl`` (they are run again).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord

from common.atomic import atomic_file
from common.logs import medfed_logger
from server.report import METRICS_FILE

CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint-prev.pt"
"""The checkpoint of the round before :data:`CHECKPOINT`'s."""
NEXT = "checkpoint-next.pt"
"""A new checkpoint, complete on disk, before it is moved to :data:`CHECKPOINT`."""
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


log = medfed_logger()


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
    """Write ``run_dir/checkpoint.pt``; the one it replaces becomes ``checkpoint-prev.pt``."""
    latest = run_dir / CHECKPOINT
    atomic_save({"round": checkpoint.round, "weights": checkpoint.weights,
                 "strategy_state": checkpoint.strategy_state}, run_dir / NEXT)
    if latest.exists():
        os.replace(latest, run_dir / PREVIOUS)
    os.replace(run_dir / NEXT, latest)


def read_checkpoint(path: Path) -> Checkpoint:
    """The checkpoint in ``path``.

    Raises:
        ValueError: it cannot be read (names the file and why).
    """
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
        return Checkpoint(round=int(raw["round"]), weights=raw["weights"],
                          strategy_state=raw["strategy_state"])
    except Exception as err:  # noqa: BLE001 - any read failure is reported the same way
        raise ValueError(f"cannot read checkpoint {path}: {err or type(err).__name__}") from err


def load_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The newest readable checkpoint in ``run_dir``, or None if there is none.

    Tries ``checkpoint.pt``, then ``checkpoint-next.pt`` (left when the
    server died between writing and renaming it), then ``checkpoint-prev.pt``,
    warning when it falls back. Rows of later rounds than the one restored
    are dropped from ``metrics.jsonl`` (see :func:`rewind_metrics`).

    Raises:
        ValueError: checkpoints exist but none can be read (names each file
            and why).
    """
    problems = []
    for name in (CHECKPOINT, NEXT, PREVIOUS):
        path = run_dir / name
        if not path.exists():
            continue
        try:
            checkpoint = read_checkpoint(path)
        except ValueError as err:
            problems.append(str(err))
            continue
        if name != CHECKPOINT:
            why = "; ".join(problems) or f"{run_dir / CHECKPOINT} is missing"
            log.warning("[MedFed] WARNING: %s; resuming from %s instead (round %d)",
                        why, path, checkpoint.round)
        rewind_metrics(run_dir, checkpoint.round)
        return checkpoint
    if problems:
        raise ValueError("no readable checkpoint to resume from: " + "; ".join(problems)
                         + ". Start a new run folder (without resume) instead")
    return None


def rewind_metrics(run_dir: Path, done: int) -> None:
    """Drop ``metrics.jsonl`` rows of rounds after ``done``: those rounds are run again.

    A round the server was killed in, or whose checkpoint was lost, left rows
    that would otherwise appear twice. Rewritten atomically; a no-op when
    nothing is dropped.
    """
    path = run_dir / METRICS_FILE
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if not _after(line, done)]
    if len(kept) == len(lines):
        return
    with atomic_file(path, "w") as handle:
        handle.writelines(kept)
    log.info("[MedFed] dropped %d rows of rounds after round %d from %s (they are run again)",
             len(lines) - len(kept), done, path)


def _after(line: str, done: int) -> bool:
    """Whether a ``metrics.jsonl`` line belongs to a round after ``done``."""
    try:
        round_ = json.loads(line).get("round")
    except (ValueError, AttributeError):
        return False
    return isinstance(round_, int) and round_ > done
