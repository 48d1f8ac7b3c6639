"""Who this hospital is and what it decides for itself (its node config).

In simulation Flower's engine sets ``partition-id`` / ``num-partitions``; in
deployment the hospital's ``client`` command writes its node config (a
TOML file on the hospital's disk) with its identity and its policy. The
server cannot change any of it: the run config it sends can only make the
hospital stricter (a smaller delta), never looser.

A deployed hospital's policy (node config written by ``python -m client``):

- ``ledger-path``: its privacy ledger, always set (default
  ``KIT/privacy-ledger.json``); the experiment's ``privacy.ledger_dir`` and
  ``run_dir`` are then ignored. Its presence marks a deployed hospital.
- ``max-epsilon``: the most DP-SGD epsilon ever spent on its data. When
  set, every training round that is not DP-SGD is declined.
- ``delta``: the delta it accounts at (default :data:`DEFAULT_DELTA`); a
  smaller ``privacy.delta`` from the server tightens it, a larger one is
  ignored.
- ``allowed-metrics``: comma-separated names of the metrics that may leave
  (default :data:`common.wire.DEFAULT_ALLOWED_METRICS`); the guard refuses a
  reply carrying any other.
- ``split-seed``, ``val-fraction``, ``test-fraction``, ``slice-block``: how
  its own data folder is divided (:class:`SplitPolicy`); the server's
  ``seed`` and ``data.*_fraction`` / ``data.slice_block`` are ignored for it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from common import wire
from common.config import Settings

NodeConfig = Mapping[str, bool | int | float | str]
DEFAULT_DELTA = 1e-5
"""A deployed hospital's delta when its node config names none."""


class RoundDeclinedError(RuntimeError):
    """The hospital's own policy declines this round; nothing was trained or sent."""


@dataclass(frozen=True)
class SplitPolicy:
    """How a deployed hospital divides its own folder into train / val / test.

    Fixed by the hospital, so its held-out test split (what its evaluation
    metrics are computed on) is the same images in every run, whatever seed
    or fractions the server's experiment names.

    Attributes:
        seed: seed of the division (``split-seed``).
        val_fraction: share held out for validation (``val-fraction``).
        test_fraction: share held out for testing (``test-fraction``).
        slice_block: segmentation: neighbouring slices kept on one side
            (``slice-block``), when volumes are too few to split whole.
    """

    seed: int = 0
    val_fraction: float = 0.15
    test_fraction: float = 0.2
    slice_block: int = 8

    def __post_init__(self) -> None:
        for key, value in ((wire.VAL_FRACTION, self.val_fraction),
                           (wire.TEST_FRACTION, self.test_fraction)):
            if not 0 <= value < 1:
                raise ValueError(f"{key}={value} must lie in [0, 1)")
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(f"{wire.VAL_FRACTION} + {wire.TEST_FRACTION} must be < 1")
        if self.slice_block < 1:
            raise ValueError(f"{wire.SLICE_BLOCK}={self.slice_block} must be >= 1")


@dataclass(frozen=True)
class Hospital:
    """A hospital's own settings.

    Attributes:
        index: 0-based hospital number (its data partition in simulation).
        count: number of hospitals the data is divided among.
        name: display name.
        data_path: its own data folder (deployment); None = derive from the
            experiment's data settings and ``index``.
        device: ``auto``, ``cpu`` or ``cuda``; None = the experiment's choice.
        max_epsilon: the most epsilon it will ever spend on its data (DP);
            None = only the experiment's target applies.
        delta: the delta it accounts at; None (simulation only) = the
            experiment's ``privacy.delta``.
        ledger_path: its privacy ledger file; None (simulation only) = the
            experiment's ledger folder.
        allowed_metrics: names of the metrics its replies may carry.
        split: how it divides its own folder (deployed); None = the
            experiment's data settings (simulation).
    """

    index: int
    count: int
    name: str
    data_path: str | None = None
    device: str | None = None
    max_epsilon: float | None = None
    delta: float | None = None
    ledger_path: str | None = None
    allowed_metrics: frozenset[str] = wire.DEFAULT_ALLOWED_METRICS
    split: SplitPolicy | None = None

    @property
    def deployed(self) -> bool:
        """Whether this hospital names its own ledger (its node config is its policy)."""
        return self.ledger_path is not None

    def accounting_delta(self, server_delta: float) -> float:
        """The delta this hospital accounts at: its own, or the server's if smaller."""
        return server_delta if self.delta is None else min(self.delta, server_delta)

    def check_round(self, privacy_mode: str) -> None:
        """Decline a training round that this hospital's policy forbids.

        Raises:
            RoundDeclinedError: a ceiling is set and the run is not DP-SGD.
        """
        if self.max_epsilon is not None and privacy_mode != "dp_sgd":
            raise RoundDeclinedError(
                f"this hospital's policy sets max-epsilon={self.max_epsilon:g}, so it trains "
                f"only with privacy=dp_sgd; this run has privacy={privacy_mode}: the round is "
                "declined and nothing was trained or sent")


def _optional(node_config: NodeConfig, key: str) -> str | None:
    value = node_config.get(key)
    return None if value in (None, "") else str(value)


def _number(node_config: NodeConfig, key: str) -> float | None:
    text = _optional(node_config, key)
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"node config {key}={text!r} is not a number") from None


def allowed_metrics(node_config: NodeConfig) -> frozenset[str]:
    """The metric names this hospital lets leave (``allowed-metrics``, or the default)."""
    text = _optional(node_config, wire.ALLOWED_METRICS)
    if text is None:
        return wire.DEFAULT_ALLOWED_METRICS
    return frozenset(name.strip() for name in text.split(",") if name.strip())


def _taking_part(partition: int, count: int, settings: Settings) -> tuple[int, int]:
    """A simulated node's hospital index and hospital count under ``data.hospitals``."""
    chosen = settings.data.hospitals
    if chosen is None:
        return partition, count
    if count != len(chosen):
        raise ValueError(f"node config {wire.NUM_PARTITIONS}={count} but data.hospitals="
                         f"{list(chosen)} names {len(chosen)} hospitals")
    return int(chosen[partition]), settings.federation.num_hospitals


def hospital_from_node_config(node_config: NodeConfig,
                              settings: Settings | None = None) -> Hospital:
    """Read a hospital's identity and own settings from its node config.

    Args:
        node_config: the node's config (Flower's simulation engine, or the
            hospital's own file).
        settings: the experiment. When it sets ``data.hospitals``, a
            simulated node's ``partition-id`` i means the i-th of them (its
            index becomes that hospital's, its count
            ``federation.num_hospitals``); a deployed node keeps its own.

    Raises:
        ValueError: ``partition-id`` or ``num-partitions`` missing or out of
            range, a number that is not one, or a ceiling without the
            hospital's own ledger.
    """
    try:
        index = int(node_config[wire.PARTITION_ID])
        count = int(node_config[wire.NUM_PARTITIONS])
    except KeyError as err:
        raise ValueError(
            f"node config lacks {err.args[0]!r}; start the hospital with "
            f"--node-config \"{wire.PARTITION_ID}=0 {wire.NUM_PARTITIONS}=3 ...\""
        ) from None
    if not 0 <= index < count:
        raise ValueError(f"node config {wire.PARTITION_ID}={index} must lie in [0, {count})")
    ledger = _optional(node_config, wire.LEDGER_PATH)
    if ledger is None and settings is not None:
        index, count = _taking_part(index, count, settings)
    max_eps = _number(node_config, wire.MAX_EPSILON)
    if max_eps is not None and ledger is None:
        raise ValueError(f"node config sets {wire.MAX_EPSILON} but no {wire.LEDGER_PATH}: a "
                         "ceiling needs the hospital's own ledger (start it with python -m client)")
    delta = _number(node_config, wire.MAX_DELTA)
    if delta is not None and not 0 < delta < 1:
        raise ValueError(f"node config {wire.MAX_DELTA}={delta} must lie in (0, 1)")
    return Hospital(
        index=index,
        count=count,
        name=_optional(node_config, wire.HOSPITAL_NAME) or f"hospital-{index}",
        data_path=_optional(node_config, wire.DATA_PATH),
        device=_optional(node_config, wire.DEVICE),
        max_epsilon=max_eps,
        delta=DEFAULT_DELTA if delta is None and ledger is not None else delta,
        ledger_path=ledger,
        allowed_metrics=allowed_metrics(node_config),
        split=None if ledger is None else _split(node_config),
    )


def _split(node_config: NodeConfig) -> SplitPolicy:
    """A deployed hospital's split policy (defaults for keys it does not set)."""
    default = SplitPolicy()

    def value(key: str, fallback: float) -> float:
        found = _number(node_config, key)
        return fallback if found is None else found

    return SplitPolicy(seed=int(value(wire.SPLIT_SEED, default.seed)),
                       val_fraction=value(wire.VAL_FRACTION, default.val_fraction),
                       test_fraction=value(wire.TEST_FRACTION, default.test_fraction),
                       slice_block=int(value(wire.SLICE_BLOCK, default.slice_block)))
