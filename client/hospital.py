"""Who this hospital is and what it decides for itself (its node config).

In simulation Flower's engine sets ``partition-id`` / ``num-partitions``; in
deployment the hospital's ``client`` command sets these and its own settings.
The server can never raise what a hospital sets here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from common import wire

NodeConfig = Mapping[str, bool | int | float | str]


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
        delta: delta of its ceiling.
        ledger_path: file recording its privacy spend across runs.
    """

    index: int
    count: int
    name: str
    data_path: str | None = None
    device: str | None = None
    max_epsilon: float | None = None
    delta: float | None = None
    ledger_path: str | None = None


def _optional(node_config: NodeConfig, key: str) -> str | None:
    value = node_config.get(key)
    return None if value in (None, "") else str(value)


def hospital_from_node_config(node_config: NodeConfig) -> Hospital:
    """Read a hospital's identity and own settings from its node config.

    Raises:
        ValueError: ``partition-id`` or ``num-partitions`` missing or out of range.
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
    max_eps = _optional(node_config, wire.MAX_EPSILON)
    delta = _optional(node_config, wire.MAX_DELTA)
    return Hospital(
        index=index,
        count=count,
        name=_optional(node_config, wire.HOSPITAL_NAME) or f"hospital-{index}",
        data_path=_optional(node_config, wire.DATA_PATH),
        device=_optional(node_config, wire.DEVICE),
        max_epsilon=None if max_eps is None else float(max_eps),
        delta=None if delta is None else float(delta),
        ledger_path=_optional(node_config, wire.LEDGER_PATH),
    )
