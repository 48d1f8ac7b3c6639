"""Names of what travels between the server and the hospitals.

Record keys match Flower's strategy defaults; metric keys are plain names
that both sides (and the run folder) share.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

from flwr.app import MetricRecord

RUN_CONFIG_KEY = "medfed-config"
"""Run-config key carrying the whole validated Settings as JSON."""

ARRAYS = "arrays"
"""RecordDict key of the model weights (an ArrayRecord)."""
METRICS = "metrics"
"""RecordDict key of a reply's scalars (a MetricRecord)."""
CONFIG = "config"
"""RecordDict key of the server's round settings (a ConfigRecord)."""

SERVER_ROUND = "server-round"
PROXIMAL_MU = "proximal-mu"

NUM_EXAMPLES = "num-examples"
"""Samples (not batches) a reply is based on: FedAvg's weighting key."""
UNIT_WEIGHT = "unit-weight"
"""Always 1: the weighting key of client-level DP, which needs a plain mean."""
HOSPITAL = "hospital"
"""0-based index of the hospital that sent a reply."""
TRAIN_LOSS = "train-loss"
TRAIN_STEPS = "train-steps"
TRAIN_SECONDS = "train-seconds"

# Privacy figures a DP-SGD hospital reports with every training reply; all
# cumulative over the rounds trained so far on that hospital's data.
EPSILON = "epsilon"
DELTA = "delta"
NOISE_MULTIPLIER = "noise-multiplier"
SAMPLE_RATE = "sample-rate"
DP_STEPS = "dp-steps"

IDENTITY_KEYS = (HOSPITAL, UNIT_WEIGHT)
"""Metric keys that identify a reply and are never averaged."""

# Node-config keys a hospital sets for itself (deployment) or that Flower's
# simulation engine sets.
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
HOSPITAL_NAME = "hospital-name"
DATA_PATH = "data-path"
DEVICE = "device"
MAX_EPSILON = "max-epsilon"
MAX_DELTA = "delta"
LEDGER_PATH = "ledger-path"


def metric_record(values: Mapping[str, float]) -> MetricRecord:
    """A Flower MetricRecord of plain float scalars."""
    return MetricRecord(cast(dict[str, int | float | list[int] | list[float]], dict(values)))


def scalar(value: object) -> float:
    """A record value as a float (records type their values loosely).

    Raises:
        TypeError: the value is not a single number.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expected a number, got {type(value).__name__}")
    return float(value)
