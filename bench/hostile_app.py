"""A hostile hospital, for benchmarks and tests only: never part of MedFed's app bundle.

The ClientApp here runs MedFed's own ClientApp (its mods included, so the
hospital's guard has already passed the honest reply) and then corrupts the
reply of the hospitals named in ``hostile_plan.PLAN`` (partition id -> attack)
the way a modified hospital could after its guard. :func:`hostile_project`
builds a copy of the project whose ClientApp this is, for ``simulate(...,
project_dir=...)``.

Attacks (on the reply's weights ``w``, given the global weights ``g``):

- ``finite_1e38``: every float array filled with 1e38 (finite in float32);
- ``num_examples_1e12``: honest weights, ``num-examples`` claimed as 1e12;
- ``float64_1e300``: every float array sent as float64 filled with 1e300;
- ``scaled_x1000``: ``g + 1000 (w - g)``;
- ``sign_flip``: ``g - (w - g)`` (the honest update reversed, same norm);
- ``float16`` / ``complex64``: the first array sent in that dtype;
- ``absent_odd_rounds``: an error reply instead of training in odd rounds
  (a hospital missing from some rounds);
- ``straggler_after_round_1``: trains honestly in round 1, then sleeps
  :data:`STRAGGLE_S` seconds before training in every later round (a
  hospital that stalls but stays connected);
- ``forgets_weights``: honest, but its node state loses the global weights
  it keeps after each evaluation (:mod:`client.held_weights`), as a node
  restarted between rounds would: it asks for them in full every round.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, Error, Message, MetricRecord
from flwr.clientapp import ClientApp

from client.app import app as medfed_app
from client.held_weights import HELD_ARRAYS, HELD_DIGEST

StateDict = dict[str, torch.Tensor]
ROOT = Path(__file__).resolve().parents[1]
STRAGGLE_S = 75.0
"""The straggler's sleep (s): past tests/test_stragglers.py's 60 s phase limit, so that its
late training reply arrives while the next phase (evaluation) is open."""


def _fill(value: float, dtype: torch.dtype | None = None) -> Callable[[StateDict, StateDict],
                                                                      StateDict]:
    def attack(w: StateDict, _g: StateDict) -> StateDict:
        return {k: torch.full_like(v, value, dtype=dtype or v.dtype) if v.is_floating_point()
                else v for k, v in w.items()}
    return attack


def _scaled(factor: float) -> Callable[[StateDict, StateDict], StateDict]:
    def attack(w: StateDict, g: StateDict) -> StateDict:
        return {k: g[k] + factor * (v - g[k]) if v.is_floating_point() else v
                for k, v in w.items()}
    return attack


def _first_as(dtype: torch.dtype) -> Callable[[StateDict, StateDict], StateDict]:
    def attack(w: StateDict, _g: StateDict) -> StateDict:
        first = next(iter(w))
        return {**w, first: w[first].to(dtype)}
    return attack


ARRAY_ATTACKS: dict[str, Callable[[StateDict, StateDict], StateDict]] = {
    "finite_1e38": _fill(1e38),
    "float64_1e300": _fill(1e300, torch.float64),
    "scaled_x1000": _scaled(1000.0),
    "sign_flip": _scaled(-1.0),
    "float16": _first_as(torch.float16),
    "complex64": _first_as(torch.complex64),
}
ATTACKS = (*ARRAY_ATTACKS, "num_examples_1e12", "absent_odd_rounds", "straggler_after_round_1",
           "forgets_weights")
HONEST_REPLIES = (None, "absent_odd_rounds", "straggler_after_round_1", "forgets_weights")
"""Plans whose training replies (when they train) are MedFed's own, unchanged."""

app = ClientApp()  # no mods of its own: MedFed's run inside medfed_app


def _plan() -> dict[int, str]:
    import hostile_plan  # type: ignore[import-not-found]  # written by hostile_project

    return {int(k): str(v) for k, v in hostile_plan.PLAN.items()}


@app.train()
def train(msg: Message, context: Context) -> Message:
    """MedFed's training reply, corrupted afterwards if this hospital is hostile."""
    attack = _plan().get(int(context.node_config["partition-id"]))
    round_ = msg.content.config_records["config"]["server-round"]
    if attack == "absent_odd_rounds" and int(str(round_)) % 2 == 1:
        return Message(Error(code=4001, reason="absent this round"), reply_to=msg)
    if attack == "straggler_after_round_1" and int(str(round_)) > 1:
        time.sleep(STRAGGLE_S)
    reply = medfed_app(msg, context)
    if attack in HONEST_REPLIES or reply.has_error():
        return reply
    # the global weights trained from: sent, or held and put in place by MedFed's app
    sent = msg.content.array_records["arrays"].to_torch_state_dict()
    if attack == "num_examples_1e12":
        metrics = dict(reply.content.metric_records["metrics"])
        reply.content["metrics"] = MetricRecord({**metrics, "num-examples": 1e12})
    else:
        weights = reply.content.array_records["arrays"].to_torch_state_dict()
        reply.content["arrays"] = ArrayRecord(ARRAY_ATTACKS[attack](weights, sent))
    return reply


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """MedFed's evaluation, unchanged (its weights then lost, for ``forgets_weights``)."""
    reply = medfed_app(msg, context)
    if _plan().get(int(context.node_config["partition-id"])) == "forgets_weights":
        for key in (HELD_ARRAYS, HELD_DIGEST):
            context.state.pop(key, None)
    return reply


def hostile_project(root: Path, plan: dict[int, str]) -> Path:
    """A copy of the project under ``root`` whose ClientApp is this hostile one.

    Args:
        root: an empty or missing folder to build the copy in.
        plan: partition id (0-based hospital) -> attack name (:data:`ATTACKS`).
    """
    unknown = sorted(set(plan.values()) - set(ATTACKS))
    if unknown:
        raise ValueError(f"unknown attack {unknown[0]!r}; known: {', '.join(ATTACKS)}")
    root.mkdir(parents=True, exist_ok=True)
    for package in ("common", "server", "client"):
        shutil.copytree(ROOT / package, root / package,
                        ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
    shutil.copy(Path(__file__), root / "hostile_app.py")
    (root / "hostile_plan.py").write_text(f"PLAN = {json.dumps(plan)}\n")
    pyproject = (ROOT / "pyproject.toml").read_text()
    pyproject = pyproject.replace('clientapp = "client.app:app"', 'clientapp = "hostile_app:app"')
    pyproject = pyproject.replace('fab-include = [',
                                  'fab-include = ["hostile_app.py", "hostile_plan.py", ')
    if 'hostile_app:app' not in pyproject or '"hostile_plan.py"' not in pyproject:
        raise RuntimeError("pyproject.toml no longer has the clientapp / fab-include lines "
                           "hostile_project rewrites")
    (root / "pyproject.toml").write_text(pyproject)
    return root
