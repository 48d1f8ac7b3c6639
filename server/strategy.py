"""Flower strategies, by name, inside MedFed's checking wrapper.

The round loop is Flower's own (``Strategy.start``). :class:`CheckedStrategy`
holds the configured Flower strategy (FedAvg, FedAdam...) the way Flower's
DP wrappers hold theirs, and adds, around its ``configure_*`` /
``aggregate_*`` hooks:

- the round offset of a resumed run (:meth:`CheckedStrategy.true_round`),
  applied here alone: the wrapped strategy, the hospitals and the run
  folder see true round numbers;
- every reply is checked (:mod:`server.replies`) and a bad one is dropped
  and logged, never averaged in; so is a hospital that did not answer
  within the round's time limit;
- every sound training reply's influence is bounded (:mod:`server.influence`:
  update norm, update direction, weight), except under client-level DP,
  whose clipping bound is the norm bound and whose sensitivity analysis
  needs each reply judged on its own;
- FedTrimmedAvg trims at least one reply per end whenever 3 or more are
  aggregated (Flower's ``int(beta * n)`` trims none of 3 at ``beta=0.2``);
- a round in which fewer than the configured minimum of hospitals answered
  soundly fails the run with a clear message (Flower alone would go on);
- each phase's sound replies and aggregate become one
  :class:`~server.round_report.PhaseReport`, taken by the ServerApp's
  end-of-round function (:meth:`CheckedStrategy.take_report`);
- sound training replies are aggregated in the order of their hospitals
  (not of their arrival), so a run's aggregates do not depend on which
  hospital finished first;
- a training message to a hospital that holds the weights it would carry
  (it answered the last evaluation, whose weights had the same digest)
  carries only their digest (:mod:`server.held_weights`), when the grid
  resends the full message to a hospital that asks (:meth:`CheckedStrategy.resend`).

Replies name hospitals: a node's hospital is learnt from its first sound
reply (its ``hospital`` index); a node not yet identified is named by its
Flower node id.
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
    Strategy,
)

from common import wire
from common.config import Settings, StrategyConfig
from common.intervals import overall_intervals
from common.logs import medfed_logger
from common.wire_cost import message_bytes, messages_bytes
from common.wire_dtype import MODEL_DTYPE, from_wire, reply_spec
from server.held_weights import HeldWeights
from server.influence import bound_influence
from server.replies import ArraySpec, array_spec, evaluate_reply_problem, train_reply_problem
from server.report import RunRecorder
from server.round_report import PhaseReport, RoundReport

log = medfed_logger()


class RoundFailedError(RuntimeError):
    """Too few hospitals answered a round soundly to go on."""


def weighted_mean(replies: list[RecordDict], weighting_key: str) -> MetricRecord:
    """Average every metric over replies, weighted by ``weighting_key``.

    Validation metrics (``val-*``) are weighted by ``val-num-examples``
    instead when ``weighting_key`` is ``num-examples``. A metric missing
    (undefined) at some hospitals is averaged over those that have it; the
    weighting keys are summed; identity keys are left out. Interval bounds
    (``auc-ci-low``, ...) are not averaged: the overall interval is the normal
    approximation of the weighted mean of independent hospitals
    (:func:`common.intervals.combined_bounds`); ROC counts are summed.
    """
    val_key = wire.VAL_NUM_EXAMPLES if weighting_key == wire.NUM_EXAMPLES else weighting_key
    counted = {weighting_key, val_key}
    totals: dict[str, float] = {}
    weights: dict[str, float] = {}
    counts = dict.fromkeys(counted, 0.0)
    records = [content.metric_records[wire.METRICS] for content in replies]
    for metrics in records:
        for key in counted:
            counts[key] += wire.scalar(metrics.get(key, 0.0))
        for key, value in metrics.items():
            if key in wire.IDENTITY_KEYS or key in counted or isinstance(value, list) \
                    or key in wire.INTERVAL_METRICS:
                continue
            weight_key = val_key if key.startswith(wire.VALIDATION_PREFIX) else weighting_key
            weight = wire.scalar(metrics.get(weight_key, 0.0))
            if math.isfinite(wire.scalar(value)):
                totals[key] = totals.get(key, 0.0) + weight * wire.scalar(value)
                weights[key] = weights.get(key, 0.0) + weight
    out: dict[str, Any] = {key: totals[key] / weights[key] for key in totals if weights[key] > 0}
    out[weighting_key] = counts[weighting_key]
    if counts[val_key] > 0:
        out[val_key] = counts[val_key]
    out.update(overall_intervals([dict(m) for m in records], weighting_key))
    out.update(_summed_counts(records))
    return wire.metric_record(out)


def _summed_counts(records: list[MetricRecord]) -> dict[str, list[int]]:
    """ROC counts summed over hospitals (those whose lists have the common length)."""
    out: dict[str, list[int]] = {}
    for key in sorted(wire.ROC_LISTS):
        lists = [list(v) for m in records if isinstance(v := m.get(key), list)]
        if lists and len({len(v) for v in lists}) == 1:
            out[key] = [int(sum(column)) for column in zip(*lists, strict=True)]
    return out


def as_float32(arrays: ArrayRecord) -> ArrayRecord:
    """``arrays`` with every float64 array cast to float32 (others unchanged)."""
    if all(a.dtype != "float64" for a in arrays.values()):
        return arrays
    state = arrays.to_torch_state_dict()
    return ArrayRecord({k: v.float() if v.dtype == torch.float64 else v for k, v in state.items()})


class CheckedStrategy(Strategy):
    """A Flower strategy wrapped with MedFed's checks; see the module docstring.

    Args:
        strategy: the Flower strategy that configures rounds and aggregates.
        recorder: the run folder (failures are written as they are found).
        min_train: the fewest sound training replies a round may aggregate.
        min_evaluate: the fewest evaluation replies before a warning.
        bounds: the influence bounds (None: no bounds, under client-level DP).
        round_offset: rounds completed before this run started (resume).
        wire_dtype: the float type training replies must carry
            (``federation.wire_dtype``); cast back to float32 once checked.
    """

    def __init__(self, strategy: Strategy, recorder: RunRecorder, *, min_train: int = 1,
                 min_evaluate: int = 1, bounds: StrategyConfig | None = None,
                 round_offset: int = 0, wire_dtype: str = MODEL_DTYPE) -> None:
        super().__init__()
        self.wire_dtype = wire_dtype
        self.strategy = strategy
        self.recorder = recorder
        self.min_train = min_train
        self.min_evaluate = min_evaluate
        self.bounds = bounds
        self.round_offset = round_offset
        self.last_aggregated = 0
        """Training replies averaged in by the last :meth:`aggregate_checked`."""
        self._expected: ArraySpec = {}
        self._global = ArrayRecord()
        self._sent: list[Message] = []
        self._sent_to: dict[str, int] = {}
        self._hospital_of_node: dict[int, str] = {}
        self._phases: dict[str, PhaseReport] = {}
        self._wire: dict[str, int] = {}
        """Bytes of the round's messages (``wire-bytes-*``, see :mod:`common.wire_cost`)."""
        self.held = HeldWeights()
        """Which global weights each hospital holds (training messages as digests)."""

    def true_round(self, server_round: int) -> int:
        """The round's number counted over a resumed run's earlier rounds (the one offset)."""
        return server_round + self.round_offset

    def summary(self) -> None:
        """Log the wrapped strategy's configuration."""
        self.strategy.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Send the round with its true number; remember the shapes sent.

        Server-side optimisers (FedAdam...) compute in float64 numpy; the
        model is float32, so float64 arrays are sent back as float32. When
        ``grid`` resends on this strategy's behalf (its ``resend`` is
        :meth:`resend`), a hospital that holds the weights is sent their
        digest instead (:meth:`server.held_weights.HeldWeights.lighten`).
        """
        arrays = as_float32(arrays)
        self._expected = reply_spec(array_spec(arrays), self.wire_dtype)
        self._global = arrays
        self._phases = {}
        self._sent = list(self.strategy.configure_train(
            self.true_round(server_round), arrays, config, grid))
        if getattr(grid, "resend", None) == self.resend:
            self._sent = self.held.lighten(self._sent)
        self._wire = {"wire-bytes-train-sent": messages_bytes(self._sent),
                      "wire-bytes-train-received": 0,
                      "wire-messages-train-sent": len(self._sent),
                      "wire-messages-train-digest": self.held.lightened,
                      "wire-messages-train-resent": 0}
        self._sent_to = {}
        return self._sent

    def resend(self, reply: Message) -> Message | None:
        """The training message with the weights, for a hospital that asks for them.

        Called by the grid (:class:`server.prompt_grid.PromptGrid`) for every
        reply as it arrives: for a :data:`common.wire.WEIGHTS_NOT_HELD` reply
        to a digest message of this phase, the full message (then pushed in
        its place, its bytes and the ask's counted in ``wire-bytes-train-*``);
        for any other reply, None.
        """
        full = self.held.full_for(reply)
        if full is None:
            return None
        asked = reply.metadata.reply_to_message_id
        self._sent = [full if m.metadata.message_id == asked else m for m in self._sent]
        self._sent_to = {}
        self._wire["wire-bytes-train-sent"] += message_bytes(full)
        self._wire["wire-bytes-train-received"] += message_bytes(reply)
        self._wire["wire-messages-train-resent"] += 1
        log.info("[MedFed] %s does not hold the global weights; sent them in full",
                 self.hospital_of_node(full.metadata.dst_node_id))
        return full

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Send the evaluation with its true round number (float64 arrays as float32).

        Note the weights each hospital is sent (:class:`server.held_weights.HeldWeights`).
        """
        self._sent = list(self.strategy.configure_evaluate(
            self.true_round(server_round), as_float32(arrays), config, grid))
        self.held.sent_to_evaluate(self._sent)
        self._wire["wire-bytes-evaluate-sent"] = messages_bytes(self._sent)
        self._sent_to = {}
        return self._sent

    def node_of(self, msg: Message) -> int:
        """The node a reply answers for: the destination of the message it replies to.

        (The grid sets message IDs on push; an error reply the SuperLink
        writes for a node that died comes from the SuperLink itself.) The
        map is built once per phase, after the push: once per reply it made
        checking a round's replies quadratic in the hospitals.
        """
        if len(self._sent_to) != len(self._sent):
            self._sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in self._sent}
        meta = msg.metadata
        return self._sent_to.get(meta.reply_to_message_id, meta.src_node_id)

    def hospital_of(self, msg: Message) -> str:
        """The hospital a reply answers for, by its node's first sound reply."""
        return self.hospital_of_node(self.node_of(msg))

    def hospital_of_node(self, node: int) -> str:
        """A node's hospital name, or ``node <id> (not yet identified)``."""
        return self._hospital_of_node.get(node, f"node {node} (not yet identified)")

    def _fail(self, round_: int, phase: str, msg: Message, reason: str) -> None:
        node = self.node_of(msg)
        self.recorder.failure(round_, phase, self.hospital_of_node(node), reason, node=node)

    def _missing(self, round_: int, phase: str, replies: list[Message]) -> None:
        """Log every hospital sent a message that did not answer in time."""
        answered = {m.metadata.reply_to_message_id for m in replies}
        for sent in self._sent:
            if sent.metadata.message_id and sent.metadata.message_id not in answered:
                node = sent.metadata.dst_node_id
                self.recorder.failure(round_, phase, self.hospital_of_node(node),
                                      "no reply within the round's time limit "
                                      "(federation.round_timeout_s)", node=node)

    def _sound(self, round_: int, phase: str, replies: list[Message]) -> list[Message]:
        self._missing(round_, phase, replies)
        sound = []
        for msg in replies:
            if msg.has_error():
                self._fail(round_, phase, msg, str(msg.error.reason))
                continue
            problem = (train_reply_problem(msg, self._expected) if phase == "train"
                       else evaluate_reply_problem(msg))
            if problem:
                self._fail(round_, phase, msg, f"reply dropped: {problem}")
                continue
            if phase == "train":
                msg.content[wire.ARRAYS] = from_wire(msg.content.array_records[wire.ARRAYS])
            metrics = dict(msg.content[wire.METRICS])
            self._hospital_of_node[self.node_of(msg)] = self.recorder.name(metrics)
            sound.append(msg)
        return sound

    def sound_train_replies(self, server_round: int, replies: Iterable[Message]
                            ) -> list[Message]:
        """The training replies that may be aggregated, each one checked and bounded.

        Dropped, clipped and capped replies are logged with their hospital.
        """
        round_ = self.true_round(server_round)
        sound = self._sound(round_, "train", list(replies))
        if self.bounds is None or not sound:
            return sound

        def report(index: int, reason: str, dropped: bool) -> None:
            if dropped:
                self._fail(round_, "train", sound[index], f"reply dropped: {reason}")
            else:
                self.recorder.bounded(round_, self.hospital_of(sound[index]), reason)

        weighting = str(getattr(self.strategy, "weighted_by_key", wire.NUM_EXAMPLES))
        bounded = bound_influence(sound, self._global, self.bounds, weighting, report)
        return [sound[i] for i in bounded.kept]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check and bound the training replies, then aggregate the sound ones."""
        replies = list(replies)
        self._wire["wire-bytes-train-received"] = (self._wire.get("wire-bytes-train-received", 0)
                                                   + messages_bytes(replies))
        return self.aggregate_checked(server_round,
                                      self.sound_train_replies(server_round, replies))

    def aggregate_checked(self, server_round: int, sound: list[Message]
                          ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate training replies already checked, in hospital order; fail if too few.

        Raises:
            RoundFailedError: fewer than ``federation.min_train`` replies.
        """
        round_ = self.true_round(server_round)
        sound = sorted(sound, key=self._hospital_order)
        self.last_aggregated = len(sound)
        if len(sound) < self.min_train:
            raise RoundFailedError(
                f"round {round_}: only {len(sound)} hospital(s) trained successfully, fewer "
                f"than federation.min_train={self.min_train}; see the warnings above"
            )
        arrays, metrics = self.strategy.aggregate_train(round_, sound)
        self._phases["train"] = PhaseReport(
            "train", tuple(dict(m.content[wire.METRICS]) for m in sound), dict(metrics or {}))
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        """Aggregate the sound evaluation replies."""
        round_ = self.true_round(server_round)
        replies = list(replies)
        self._wire["wire-bytes-evaluate-received"] = messages_bytes(replies)
        self.held.evaluated({self.node_of(m) for m in replies if not m.has_error()})
        sound = self._sound(round_, "evaluate", replies)
        if len(sound) < self.min_evaluate:
            self.recorder.failure(round_, "evaluate", "overall",
                                  f"only {len(sound)} hospital(s) evaluated")
        if not sound:
            return None
        metrics = self.strategy.aggregate_evaluate(round_, sound)
        self._phases["evaluate"] = PhaseReport(
            "evaluate", tuple(dict(m.content[wire.METRICS]) for m in sound), dict(metrics or {}))
        return metrics

    def _hospital_order(self, reply: Message) -> tuple[float, int]:
        """A sound reply's place in aggregation: its hospital's index, then its node."""
        index = reply.content.metric_records[wire.METRICS].get(wire.HOSPITAL)
        number = isinstance(index, int | float) and not isinstance(index, bool)
        return (float(index) if number else math.inf, self.node_of(reply))  # type: ignore[arg-type]

    def take_report(self, server_round: int) -> RoundReport:
        """The round's train and evaluate phases, as one report (and forget them).

        The round's message bytes join the train phase's ``overall`` metrics.
        """
        phases, self._phases = self._phases, {}
        train = phases.get("train")
        if train is not None:
            phases["train"] = PhaseReport(train.phase, train.replies,
                                          {**train.overall, **self._wire})
        return RoundReport(self.true_round(server_round), train=phases.get("train"),
                           evaluate=phases.get("evaluate"))


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


def build_strategy(settings: Settings, recorder: RunRecorder, *,
                   round_offset: int = 0) -> CheckedStrategy:
    """The configured Flower strategy, inside :class:`CheckedStrategy`."""
    fed = settings.federation
    min_evaluate = fed.min_evaluate if fed.fraction_evaluate > 0 else 0
    inner = STRATEGIES[settings.strategy.name](
        fraction_train=fed.fraction_train,
        fraction_evaluate=fed.fraction_evaluate,
        min_train_nodes=fed.min_train,
        min_evaluate_nodes=min_evaluate,
        min_available_nodes=fed.min_train,
        # client-level DP calibrates its noise to a plain mean of clipped updates
        weighted_by_key=(wire.UNIT_WEIGHT if settings.privacy.mode == "client_level"
                         else wire.NUM_EXAMPLES),
        train_metrics_aggr_fn=weighted_mean,
        evaluate_metrics_aggr_fn=weighted_mean,
        **_specific_kwargs(settings),
    )
    return CheckedStrategy(
        inner, recorder, min_train=fed.min_train, min_evaluate=min_evaluate,
        bounds=None if settings.privacy.mode == "client_level" else settings.strategy,
        round_offset=round_offset, wire_dtype=fed.wire_dtype)
