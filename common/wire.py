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
GLOBAL_DIGEST = "global-digest"
"""Train config key sent instead of the global weights to a hospital that holds them
(:func:`common.digest.arrays_digest` of the weights it was last sent to evaluate)."""
WEIGHTS_NOT_HELD = 4007
"""Error code of a training reply from a hospital that does not hold the weights a
``global-digest`` names (a restarted node, other weights): the server resends them in full."""

NUM_EXAMPLES = "num-examples"
"""Samples (not batches) a reply is based on: FedAvg's weighting key."""
UNIT_WEIGHT = "unit-weight"
"""Always 1: the weighting key of client-level DP, which needs a plain mean."""
HOSPITAL = "hospital"
"""0-based index of the hospital that sent a reply."""
TRAIN_LOSS = "train-loss"
TRAIN_STEPS = "train-steps"
TRAIN_SECONDS = "train-seconds"

# Privacy figures a DP-SGD hospital reports with every training reply
EPSILON = "epsilon"
"""Cumulative epsilon on the hospital's data (every run its ledger counts)."""
RUN_EPSILON = "run-epsilon"
"""Cumulative epsilon of this run's rounds alone."""
DELTA = "delta"
NOISE_MULTIPLIER = "noise-multiplier"
SAMPLE_RATE = "sample-rate"
DP_STEPS = "dp-steps"
"""DP-SGD steps of this run so far (fixed by N, batch size and epochs)."""

IDENTITY_KEYS = (HOSPITAL, UNIT_WEIGHT)
"""Metric keys that identify a reply and are never averaged."""

PRIVACY_METRICS = frozenset({EPSILON, RUN_EPSILON, DELTA, NOISE_MULTIPLIER, SAMPLE_RATE,
                             DP_STEPS})
DP_TRAIN_METRICS = frozenset({NUM_EXAMPLES, HOSPITAL}) | PRIVACY_METRICS
"""All a DP-SGD training reply may carry besides the weights: the privacy
figures, ``num-examples`` (the training split's size N, not what Poisson
sampling drew) and the hospital's number. Nothing computed from the images
without noise (no loss, no timing)."""
TRAIN_METRICS = frozenset({NUM_EXAMPLES, HOSPITAL, UNIT_WEIGHT, TRAIN_LOSS, TRAIN_STEPS,
                           TRAIN_SECONDS})
"""What a training reply carries without DP-SGD."""
CLINICAL_METRICS = ("auc", "accuracy", "sensitivity", "specificity", "dice", "hd95")
"""The metrics reported with confidence intervals."""
CI_LOW, CI_HIGH = "-ci-low", "-ci-high"
"""Suffixes of a metric's interval bounds (``auc-ci-low``, ``auc-ci-high``)."""
ROC_TP, ROC_FP = "roc-tp", "roc-fp"
"""Lists of true / false positives at each threshold of the ROC grid (two classes);
element 0 (threshold 0) is the number of positive / negative images."""
ROC_LISTS = frozenset({ROC_TP, ROC_FP, "val-" + ROC_TP, "val-" + ROC_FP})
"""The only metrics that are lists (of image counts), on the test and validation splits."""
MAX_PER_CLASS = 16
"""Classes whose per-class metrics (``auc-class-k``, ...) a reply may carry."""
INTERVAL_METRICS = frozenset(m + side for m in CLINICAL_METRICS for side in (CI_LOW, CI_HIGH))
PER_CLASS_METRICS = frozenset(f"{m}-class-{k}" for m in ("auc", "sensitivity", "specificity")
                              for k in range(MAX_PER_CLASS))
EVALUATE_METRICS = (frozenset({NUM_EXAMPLES, HOSPITAL, UNIT_WEIGHT, "loss", *CLINICAL_METRICS,
                               ROC_TP, ROC_FP}) | INTERVAL_METRICS | PER_CLASS_METRICS)
"""What an evaluation reply may carry (see :mod:`common.evaluation`): the lists
``roc-tp``/``roc-fp`` are counts of images, aggregate figures like the others."""
VALIDATION_PREFIX = "val-"
"""Prefix of the evaluation metrics a hospital computes on its validation split."""
VAL_NUM_EXAMPLES = VALIDATION_PREFIX + NUM_EXAMPLES
"""Validation samples a reply's ``val-*`` metrics are based on (their weighting key)."""
VALIDATION_METRICS = frozenset(VALIDATION_PREFIX + key for key in EVALUATE_METRICS
                               if key not in IDENTITY_KEYS)
"""What an evaluation reply may carry about the validation split (model selection)."""
PERSONALISE_EPOCHS = "personalise-epochs"
"""Evaluation config key: fine-tune this many epochs locally, then score both models."""
PERSONAL_PREFIX = "personal-"
"""Prefix of the test metrics of a hospital's personalised (locally fine-tuned) model."""
PERSONAL_EPOCHS = PERSONAL_PREFIX + "epochs"
"""Fine-tuning epochs the kept personalised model had (0: the global model was kept)."""
PERSONAL_METRICS = frozenset({PERSONAL_PREFIX + key for key in EVALUATE_METRICS
                              if key not in IDENTITY_KEYS} | {PERSONAL_EPOCHS})
"""What a personalisation reply carries besides the global model's evaluation metrics."""
DEFAULT_ALLOWED_METRICS = (DP_TRAIN_METRICS | TRAIN_METRICS | EVALUATE_METRICS
                           | VALIDATION_METRICS | PERSONAL_METRICS)
"""A hospital's ``allowed-metrics`` when it names none: what MedFed sends."""

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
ALLOWED_METRICS = "allowed-metrics"
SPLIT_SEED = "split-seed"
VAL_FRACTION = "val-fraction"
TEST_FRACTION = "test-fraction"
SLICE_BLOCK = "slice-block"


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
