"""Flower strategies, by name, with MedFed's checks around their hooks.

The round loop is Flower's own (``Strategy.start``). MedFed adds, through the
``configure_*`` / ``aggregate_*`` hooks only:

- every reply is checked (:mod:`server.replies`) and a bad one is dropped
  and logged, never averaged in;
- every sound training reply's influence is bounded (:mod:`server.influence`:
  update norm, update direction, weight), except under client-level DP,
  whose clipping bound is the norm bound and whose sensitivity analysis
  needs each reply judged on its own;
- FedTrimmedAvg trims at least one reply per end whenever 3 or more are
  aggregated (Flower's ``int(beta * n)`` trims none of 3 at ``beta=0.2``);
- a round in which fewer than the configured minimum of hospitals answered
  soundly fails the run with a clear message (Flower alone would go on);
- per-hospital metrics go to the run folder;
- a round offset, so a resumed run keeps counting rounds where it stopped.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
)

from common import wire
from common.config import Settings, StrategyConfig
from server.influence import bound_influence
from server.replies import ArraySpec, array_spec, evaluate_reply_problem, train_reply_problem
from server.report import RunRecorder


class RoundFailedError(RuntimeError):
    """Too few hospitals answered a round soundly to go on."""


def weighted_mean(replies: list[RecordDict], weighting_key: str) -> MetricRecord:
    """Average every metric over replies, weighted by ``weighting_key``.

    A metric missing (undefined) at some hospitals is averaged over those
    that have it; ``num-examples`` is summed; identity keys are left out.
    """
    totals: dict[str, float] = {}
    weights: dict[str, float] = {}
    count = 0.0
    for content in replies:
        metrics = content.metric_records[wire.METRICS]
        weight = wire.scalar(metrics[weighting_key])
        count += weight
        for key, value in metrics.items():
            if key in wire.IDENTITY_KEYS or key == weighting_key or isinstance(value, list):
                continue
            if math.isfinite(wire.scalar(value)):
                totals[key] = totals.get(key, 0.0) + weight * wire.scalar(value)
                weights[key] = weights.get(key, 0.0) + weight
    out = {key: totals[key] / weights[key] for key in totals if weights[key] > 0}
    out[weighting_key] = count
    return wire.metric_record(out)


def as_float32(arrays: ArrayRecord) -> ArrayRecord:
    """``arrays`` with every float64 array cast to float32 (others unchanged)."""
    if all(a.dtype != "float64" for a in arrays.values()):
        return arrays
    state = arrays.to_torch_state_dict()
    return ArrayRecord({k: v.float() if v.dtype == torch.float64 else v for k, v in state.items()})


class CheckedRounds:
    """Mixin placed before a Flower strategy class; see the module docstring."""

    recorder: RunRecorder
    round_offset: int = 0
    min_train: int = 1
    min_evaluate: int = 1
    bounds: StrategyConfig | None = None
    """The influence bounds (None: no bounds, under client-level DP)."""
    last_aggregated: int = 0
    """Training replies averaged in by the last :meth:`aggregate_train`."""
    _expected: ArraySpec
    _global: ArrayRecord
    _sent: list[Message]

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Send the round with its true number; remember the shapes sent.

        Server-side optimisers (FedAdam...) compute in float64 numpy; the
        model is float32, so float64 arrays are sent back as float32.
        """
        arrays = as_float32(arrays)
        self._expected = array_spec(arrays)
        self._global = arrays
        self._sent = list(super().configure_train(  # type: ignore[misc]
            server_round + self.round_offset, arrays, config, grid))
        return self._sent

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Send the evaluation with its true round number."""
        self._sent = list(super().configure_evaluate(  # type: ignore[misc]
            server_round + self.round_offset, arrays, config, grid))
        return self._sent

    def node_of(self, msg: Message) -> str:
        """``node <id>`` a reply answers for.

        The destination of the message it replies to (the grid sets message
        IDs on push): an error reply the SuperLink writes for a node that
        died comes from the SuperLink itself.
        """
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id
                   for m in getattr(self, "_sent", [])}
        meta = msg.metadata
        return f"node {sent_to.get(meta.reply_to_message_id, meta.src_node_id)}"

    def _sound(self, round_: int, phase: str, replies: Iterable[Message]) -> list[Message]:
        sound = []
        for msg in replies:
            node = self.node_of(msg)
            if msg.has_error():
                self.recorder.failure(round_, phase, node, str(msg.error.reason))
                continue
            problem = (train_reply_problem(msg, self._expected) if phase == "train"
                       else evaluate_reply_problem(msg))
            if problem:
                self.recorder.failure(round_, phase, node, f"reply dropped: {problem}")
                continue
            sound.append(msg)
        return sound

    def sound_train_replies(self, server_round: int, replies: Iterable[Message]
                            ) -> list[Message]:
        """The training replies that may be aggregated, each one checked and bounded.

        Dropped, clipped and capped replies are logged with their node.
        """
        round_ = server_round + self.round_offset
        sound = self._sound(round_, "train", list(replies))
        if self.bounds is None or not sound:
            return sound

        def report(index: int, reason: str, dropped: bool) -> None:
            node = self.node_of(sound[index])
            if dropped:
                self.recorder.failure(round_, "train", node, f"reply dropped: {reason}")
            else:
                self.recorder.bounded(round_, node, reason)

        weighting = str(getattr(self, "weighted_by_key", wire.NUM_EXAMPLES))
        bounded = bound_influence(sound, self._global, self.bounds, weighting, report)
        return [sound[i] for i in bounded.kept]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the sound training replies; fail if too few."""
        round_ = server_round + self.round_offset
        sound = self.sound_train_replies(server_round, replies)
        self.last_aggregated = len(sound)
        if len(sound) < self.min_train:
            raise RoundFailedError(
                f"round {round_}: only {len(sound)} hospital(s) trained successfully, fewer "
                f"than federation.min_train={self.min_train}; see the warnings above"
            )
        arrays, metrics = super().aggregate_train(server_round, sound)  # type: ignore[misc]
        self.recorder.record(round_, "train", [dict(m.content[wire.METRICS]) for m in sound],
                             dict(metrics or {}))
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        """Aggregate the sound evaluation replies and record them per hospital."""
        round_ = server_round + self.round_offset
        sound = self._sound(round_, "evaluate", list(replies))
        if len(sound) < self.min_evaluate:
            self.recorder.failure(round_, "evaluate", "overall",
                                  f"only {len(sound)} hospital(s) evaluated")
        if not sound:
            return None
        metrics = super().aggregate_evaluate(server_round, sound)  # type: ignore[misc]
        self.recorder.record(round_, "evaluate", [dict(m.content[wire.METRICS]) for m in sound],
                             dict(metrics or {}))
        return metrics


def trim_fraction(beta: float, replies: int) -> float:
    """``beta``, raised so that ``int(beta * replies) >= 1`` whenever that is possible.

    Trimming one reply per end of ``n`` needs ``1/n < 0.5``, so 3 or more replies.
    """
    if replies >= 3 and int(beta * replies) < 1:
        return float(min(np.nextafter(1.0 / replies, 1.0), 0.4999))
    return beta


class TrimmedAvgAtLeastOne(FedTrimmedAvg):
    """Flower's FedTrimmedAvg, trimming at least one reply per end when it can."""

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Trimmed mean with the round's trim fraction (:func:`trim_fraction`)."""
        replies = list(replies)
        configured = self.beta
        self.beta = trim_fraction(configured, sum(not m.has_error() for m in replies))
        try:
            return super().aggregate_train(server_round, replies)
        finally:
            self.beta = configured


STRATEGIES: dict[str, type] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedadagrad": FedAdagrad,
    "fedavgm": FedAvgM,
    "fedmedian": FedMedian,
    "fedtrimmedavg": TrimmedAvgAtLeastOne,
    "krum": Krum,
}


def _specific_kwargs(settings: Settings) -> dict[str, Any]:
    s = settings.strategy
    if s.name == "fedprox":
        return {"proximal_mu": s.proximal_mu}
    if s.name in ("fedadam", "fedyogi", "fedadagrad"):
        return {"eta": s.server_lr, "eta_l": settings.train.lr, "tau": s.tau}
    if s.name == "fedavgm":
        return {"server_learning_rate": s.server_lr, "server_momentum": s.server_momentum}
    if s.name == "fedtrimmedavg":
        return {"beta": s.trim_beta}
    if s.name == "krum":
        return {"num_malicious_nodes": s.num_malicious}
    return {}


def build_strategy(settings: Settings, recorder: RunRecorder, *, round_offset: int = 0) -> Any:
    """The configured Flower strategy, wrapped with :class:`CheckedRounds`."""
    base = STRATEGIES[settings.strategy.name]
    cls = type(f"Checked{base.__name__}", (CheckedRounds, base), {})
    fed = settings.federation
    strategy = cls(
        fraction_train=fed.fraction_train,
        fraction_evaluate=fed.fraction_evaluate,
        min_train_nodes=fed.min_train,
        min_evaluate_nodes=fed.min_evaluate if fed.fraction_evaluate > 0 else 0,
        min_available_nodes=fed.min_train,
        # client-level DP calibrates its noise to a plain mean of clipped updates
        weighted_by_key=(wire.UNIT_WEIGHT if settings.privacy.mode == "client_level"
                         else wire.NUM_EXAMPLES),
        train_metrics_aggr_fn=weighted_mean,
        evaluate_metrics_aggr_fn=weighted_mean,
        **_specific_kwargs(settings),
    )
    strategy.recorder = recorder
    strategy.round_offset = round_offset
    strategy.min_train = fed.min_train
    strategy.min_evaluate = fed.min_evaluate if fed.fraction_evaluate > 0 else 0
    strategy.bounds = None if settings.privacy.mode == "client_level" else settings.strategy
    return strategy
