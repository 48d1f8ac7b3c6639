"""How far one hospital may move the global model in one round.

Runs on the training replies that passed :mod:`server.replies` (right keys,
shapes, dtypes, finite values), before the strategy aggregates them. A
hospital's *update* is its returned weights minus the global weights sent
this round, over the floating-point arrays; its L2 norm is taken in float64.

1. **Norm**: an update longer than the bound (``norm_factor`` x the round's
   lower median update norm, or the absolute ``max_update_norm``) is
   dropped (default) or clipped to the bound. Drop is the default because
   an update far longer than its peers (finite 1e38 weights, an update
   scaled x1000) carries a direction nobody can trust: clipping it would
   still add a garbage step of honest length to every round, while an
   honest hospital sits near the median, far inside a bound of 4x it.
2. **Direction**: with 3 or more updates, the one that agrees least with the
   others is dropped if its cosine similarity with *every* other update of
   the round is below ``min_cosine`` (at most one per round: late in
   training honest updates are nearly orthogonal, cosines around -0.01, so
   when a sign-flipped one (-0.07 and below) is among them, all three fall
   under 0; dropping only the worst keeps the honest two). This catches an
   update of honest length that points the other way (a sign-flipped
   update), which no norm bound can.
   (A check against the coordinate-wise median let a sign-flipped update
   through after round 1 of a 20-round pneumonia run: each update is part
   of the median it is compared with.)
3. **Weight**: no hospital's ``num-examples`` may exceed ``max_weight_share``
   of the round's total; a larger claim is capped (water-filling), so one
   hospital claiming 1e12 samples gets at most that share, not the model.

What this holds against: one hostile hospital in a round of three or more
(measured with one of three, ``bench/robustness.py``), sending whatever it
likes; the norm and weight bounds also limit several, the direction check
drops at most one per round. It
bounds, it does not prove: a hostile update of honest length and roughly
honest direction still moves the model a little. It is applied by the
coordinator, which must be trusted to. With two replies in a round there
is no majority to compare against: the median norm bound and the
direction check are then skipped (an absolute bound still applies).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, Message

from common import wire
from common.config import StrategyConfig

Update = dict[str, np.ndarray]
Report = Callable[[int, str, bool], None]
"""Called as ``report(index, reason, dropped)`` for each bounded reply."""


@dataclass
class Bounded:
    """Replies that may be aggregated, after the bounds.

    Attributes:
        kept: indices (into the replies given) of the replies kept.
        norms: L2 norm of each reply's update (all replies, float64).
    """

    kept: list[int]
    norms: list[float]


def float_update(arrays: ArrayRecord, reference: dict[str, np.ndarray]) -> Update:
    """``arrays - reference`` in float64, for the floating-point arrays only."""
    return {key: array.numpy().astype(np.float64) - reference[key]
            for key, array in arrays.items() if key in reference}


def float_reference(global_arrays: ArrayRecord) -> dict[str, np.ndarray]:
    """The global model's floating-point arrays, in float64."""
    return {key: array.numpy().astype(np.float64) for key, array in global_arrays.items()
            if np.issubdtype(np.dtype(array.dtype), np.floating)}


def l2_norm(update: Update) -> float:
    """L2 norm over all arrays of ``update``."""
    return float(np.sqrt(sum(float(np.sum(np.square(v))) for v in update.values())))


def lower_median(values: list[float]) -> float:
    """The lower median (the smaller middle value for an even count)."""
    return sorted(values)[(len(values) - 1) // 2]


def norm_limit(norms: list[float], cfg: StrategyConfig) -> float | None:
    """The round's norm bound, or None when unbounded.

    The median bound needs 3 or more updates: of two, nobody can tell the
    hostile one, and honest updates late in training were seen 20x apart.
    """
    if cfg.norm_bound == "absolute":
        return cfg.max_update_norm
    if cfg.norm_bound == "median" and len(norms) >= 3:
        return cfg.norm_factor * lower_median(norms)
    return None


def best_agreement(updates: list[Update]) -> list[float]:
    """For each update, its largest cosine similarity with any other update.

    A zero update counts as similarity 1: it moves nothing.
    """
    count = len(updates)
    gram = np.zeros((count, count))
    for key in updates[0]:
        flat = np.stack([u[key].reshape(-1) for u in updates])
        gram += flat @ flat.T
    norms = np.sqrt(np.diag(gram))
    best = []
    for i in range(count):
        others = [gram[i, j] / (norms[i] * norms[j]) for j in range(count)
                  if j != i and norms[j] > 0]
        best.append(max(others) if norms[i] > 0 and others else 1.0)
    return [float(b) for b in best]


def share_cap(weights: list[float], max_share: float) -> float | None:
    """The cap that leaves no weight above ``max_share`` of the capped total.

    Returns None when no weight needs capping. When ``max_share`` is below
    ``1 / len(weights)`` the best possible is equal weights (the smallest).
    """
    ordered = sorted(weights, reverse=True)
    if max_share >= 1.0 or len(ordered) < 2 or ordered[0] <= max_share * sum(ordered):
        return None
    for capped in range(1, len(ordered)):
        if max_share * capped >= 1.0:
            break
        cap = max_share * sum(ordered[capped:]) / (1.0 - max_share * capped)
        if cap >= ordered[capped]:
            return cap
    return ordered[-1]


def scaled_update(arrays: ArrayRecord, update: Update, reference: dict[str, np.ndarray],
                  scale: float) -> ArrayRecord:
    """``arrays`` with their float update scaled by ``scale`` (dtypes kept)."""
    out = {}
    for key, array in arrays.items():
        if key in update:
            values = reference[key] + update[key] * scale
            out[key] = Array(np.asarray(values, dtype=np.dtype(array.dtype)))
        else:
            out[key] = array
    return ArrayRecord(out)


def _bound_norms(replies: list[Message], updates: list[Update], norms: list[float],
                 reference: dict[str, np.ndarray], cfg: StrategyConfig,
                 report: Report) -> list[int]:
    limit = norm_limit(norms, cfg)
    kept = []
    for i, norm in enumerate(norms):
        if limit is None or norm <= limit:
            kept.append(i)
        elif cfg.over_norm == "clip":
            scale = limit / norm
            replies[i].content[wire.ARRAYS] = scaled_update(
                replies[i].content.array_records[wire.ARRAYS], updates[i], reference, scale)
            updates[i] = {k: v * scale for k, v in updates[i].items()}
            report(i, f"update norm {norm:.4g} clipped to the bound {limit:.4g}", False)
            kept.append(i)
        else:
            report(i, f"update norm {norm:.4g} over the bound {limit:.4g}", True)
    return kept


def _cap_weights(replies: list[Message], kept: list[int], weighting_key: str,
                 max_share: float, report: Report) -> None:
    records = [replies[i].content.metric_records[wire.METRICS] for i in kept]
    weights = [wire.scalar(r[weighting_key]) for r in records]
    cap = share_cap(weights, max_share)
    if cap is None:
        return
    for i, record, weight in zip(kept, records, weights, strict=True):
        if weight > cap:
            record[weighting_key] = cap
            report(i, f"{weighting_key} {weight:.6g} capped to {cap:.6g} "
                      f"(strategy.max_weight_share={max_share})", False)


def bound_influence(replies: list[Message], global_arrays: ArrayRecord, cfg: StrategyConfig,
                    weighting_key: str, report: Report) -> Bounded:
    """Apply the norm, direction and weight bounds (see the module docstring).

    Replies kept may be changed in place (clipped arrays, capped weight).

    Args:
        replies: sound training replies (checked by :mod:`server.replies`).
        global_arrays: the global model sent this round.
        cfg: the strategy settings holding the bounds.
        weighting_key: the metric the strategy weights replies by.
        report: told about every reply dropped, clipped or capped.
    """
    reference = float_reference(global_arrays)
    updates = [float_update(m.content.array_records[wire.ARRAYS], reference) for m in replies]
    norms = [l2_norm(u) for u in updates]
    kept = _bound_norms(replies, updates, norms, reference, cfg, report)
    if cfg.min_cosine is not None and len(kept) >= 3:
        cosines = best_agreement([updates[i] for i in kept])
        worst = int(np.argmin(cosines))
        if cosines[worst] < cfg.min_cosine:
            report(kept.pop(worst), f"update direction: cosine at most {cosines[worst]:.3f} "
                   f"with any other update, below strategy.min_cosine={cfg.min_cosine}", True)
    if weighting_key == wire.NUM_EXAMPLES:
        _cap_weights(replies, kept, weighting_key, cfg.max_weight_share, report)
    return Bounded(kept=kept, norms=norms)
