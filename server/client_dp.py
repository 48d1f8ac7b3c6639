"""Client-level differential privacy on Flower's fixed-clipping wrappers.

Each hospital's model update (its weights minus the global weights) is
clipped to L2 norm ``C`` (on the server, or on the hospital with Flower's
``fixedclipping_mod``), the ``n`` updates that are actually aggregated in
the round are averaged with equal weights, and Gaussian noise of standard
deviation ``z * S / n`` is added to the average, where ``S`` is the most one
hospital's update can change the sum: ``C`` with server-side clipping,
``C * (1 + CLIENT_CLIP_TOLERANCE)`` with client-side clipping, where the
server checks every update and drops (and logs) one longer than that. The
noise is calibrated to ``n`` as it happened, not to the number of hospitals
planned, so a round in which a hospital is missing or dropped is not
under-noised (Flower's wrappers divide by the planned number). Each round is
thus a Gaussian mechanism with noise multiplier ``z`` on the sum of the
aggregated updates; the per-round figures actually used (``aggregated``,
``noise-std``, ``noise-multiplier`` = noise std x n / S) are recorded in
``metrics.jsonl``. The count ``n`` itself is published, not protected.

What the epsilon reported here means: a *client-level* (hospital-level)
guarantee: the released global models barely change whether or not any one
hospital took part, whatever its data. It holds against anyone who sees
the released models (other hospitals, outsiders given the model), not
against the coordinator, which sees every update before noise. It is
computed by Opacus' RDP accountant over the noisy releases that really
happened (one per completed round, with each round's recorded noise
multiplier), **without** privacy amplification by sampling (sample rate 1),
which holds however hospitals are chosen. The noise is drawn from fresh OS
entropy, not from the run's seed.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
)

from common import wire
from common.config import Settings
from common.participation import taking_part
from server.influence import float_reference, float_update, l2_norm, scaled_update

CLIENT_CLIP_TOLERANCE = 1e-4
"""Relative slack on a client-clipped update's norm (float32 rounding)."""
RELEASES = "client_dp_releases"
"""Checkpoint strategy-state key of the noisy releases so far."""

Release = dict[str, float]


def sampled_per_round(settings: Settings) -> int:
    """Hospitals Flower samples per training round (the plan, ``m``)."""
    fed = settings.federation
    return max(int(len(taking_part(settings)) * fed.fraction_train), fed.min_train)


def noisy_mean(arrays: ArrayRecord, std: float) -> ArrayRecord:
    """``arrays`` plus Gaussian noise of standard deviation ``std`` (OS entropy)."""
    rng = np.random.default_rng()
    out = {}
    for key, array in arrays.items():
        values = array.numpy()
        if np.issubdtype(values.dtype, np.floating) and std > 0:
            values = values + rng.normal(0.0, std, values.shape).astype(values.dtype)
        out[key] = Array(np.asarray(values))
    return ArrayRecord(out)


class CalibratedRelease:
    """Mixin placed before a Flower fixed-clipping wrapper; see the module docstring."""

    strategy: Any
    noise_multiplier: float
    clipping_norm: float
    sensitivity_factor: float = 1.0
    releases: list[Release]

    def _clipped(self, round_: int, replies: list[Message]) -> list[Message]:
        raise NotImplementedError

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check, clip, average and noise the updates aggregated this round.

        The checked strategy inside judges the replies first (so a malformed
        one never reaches the clipping), then aggregates exactly those kept
        here, and the noise is calibrated to that count.
        """
        inner = self.strategy
        round_ = inner.true_round(server_round)
        sound = self._clipped(round_, inner.sound_train_replies(server_round, replies))
        arrays, metrics = inner.aggregate_checked(server_round, sound)
        if arrays is None:
            return None, metrics
        count = inner.last_aggregated
        sensitivity = self.clipping_norm * self.sensitivity_factor
        std = self.noise_multiplier * sensitivity / count
        self.releases.append({"round": float(round_), "aggregated": float(count),
                              "noise-std": std, "noise-multiplier": std * count / sensitivity})
        return noisy_mean(arrays, std), metrics


class ServerSideClipping(CalibratedRelease, DifferentialPrivacyServerSideFixedClipping):
    """Updates clipped to ``C`` at the server, noise calibrated to the count aggregated."""

    def _clipped(self, round_: int, replies: list[Message]) -> list[Message]:
        # Flower's compute_clip_model_update divides by the norm: an unchanged
        # model (norm 0) would crash the round, so clip here.
        reference = float_reference(self.strategy._global)
        for reply in replies:
            record = reply.content.array_records[wire.ARRAYS]
            update = float_update(record, reference)
            norm = l2_norm(update)
            if norm > self.clipping_norm:
                reply.content[wire.ARRAYS] = scaled_update(record, update, reference,
                                                           self.clipping_norm / norm)
        return replies


class ClientSideClipping(CalibratedRelease, DifferentialPrivacyClientSideFixedClipping):
    """Updates clipped by each hospital; one over ``C`` (plus tolerance) is dropped."""

    sensitivity_factor = 1.0 + CLIENT_CLIP_TOLERANCE

    def _clipped(self, round_: int, replies: list[Message]) -> list[Message]:
        inner = self.strategy
        reference = float_reference(inner._global)
        limit = self.clipping_norm * self.sensitivity_factor
        kept = []
        for reply in replies:
            norm = l2_norm(float_update(reply.content.array_records[wire.ARRAYS], reference))
            if norm <= limit:
                kept.append(reply)
            else:
                inner.recorder.failure(
                    round_, "train", inner.hospital_of(reply),
                    f"reply dropped: update norm {norm:.6g} over the client-side clipping "
                    f"bound privacy.clipping_norm={self.clipping_norm} (not clipped)",
                    node=inner.node_of(reply))
        return kept


def wrap_client_level(strategy: Any, settings: Settings,
                      releases: list[Release] | None = None) -> Any:
    """Wrap ``strategy`` (weighted by a unit weight) for client-level DP.

    The DP wrapper is outermost, as Flower builds them (it must see the
    final aggregate to noise it), and holds the checked strategy, whose
    checks it runs before clipping anything (see :meth:`CalibratedRelease.aggregate_train`).

    Args:
        strategy: the checked strategy (:func:`server.strategy.build_strategy`).
        settings: the run's settings (``privacy.*``).
        releases: releases of earlier rounds (a resumed run), else none.
    """
    privacy = settings.privacy
    wrapper = (ServerSideClipping if privacy.clipping_side == "server"
               else ClientSideClipping)
    wrapped = wrapper(strategy, noise_multiplier=privacy.client_noise_multiplier,
                      clipping_norm=privacy.clipping_norm,
                      num_sampled_clients=sampled_per_round(settings))
    wrapped.releases = list(releases or [])
    return wrapped


def client_level_epsilon(settings: Settings, releases: list[Release]) -> dict[str, float]:
    """Client-level epsilon after the noisy ``releases`` (no amplification).

    Returns:
        ``epsilon`` (Opacus RDP over each release's noise multiplier),
        ``delta``, ``rounds`` (releases so far), ``sample-rate`` (always 1.0:
        no amplification assumed) and the last release's ``noise-multiplier``,
        ``noise-std`` and ``aggregated``. Epsilon is infinite when any
        release had no noise.
    """
    delta = settings.privacy.delta
    multipliers = [r["noise-multiplier"] for r in releases]
    if not multipliers:
        epsilon = 0.0
    elif min(multipliers) <= 0:
        epsilon = float("inf")
    else:
        from opacus.accountants import RDPAccountant  # ~1 s import: only when needed

        accountant = RDPAccountant()
        accountant.history = [(z, 1.0, 1) for z in multipliers]
        epsilon = float(accountant.get_epsilon(delta=delta))
    last = releases[-1] if releases else {}
    return {"epsilon": epsilon, "delta": delta, "rounds": float(len(releases)),
            "sample-rate": 1.0, **{k: v for k, v in last.items() if k != "round"}}
