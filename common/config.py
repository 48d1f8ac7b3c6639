"""Typed schema of a MedFed experiment.

Hydra composes the YAML files under ``conf/``; :func:`to_settings` turns the
composed config into these frozen dataclasses. Every check lives in a
``__post_init__`` so a bad value fails at start with a :class:`ConfigError`
naming the key and the allowed values. The same JSON form
(:func:`settings_to_json` / :func:`settings_from_json`) travels to the
ServerApp and ClientApps through Flower's run config.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

TASKS = ("classification", "segmentation")
THRESHOLD_METHODS = ("youden", "sensitivity", "fixed")
TRACKERS = ("tensorboard", "mlflow", "none")
CLASSIFIERS = ("cnn", "densenet121", "resnet18", "resnet34")
SEGMENTERS = ("unet", "basicunet", "attentionunet", "segresnet")
DATA_SOURCES = ("synthetic", "medmnist", "folder")
SPLITS = ("iid", "dirichlet", "natural")
VOLUME_MODES = ("slices", "patches", "volume")
STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedavgm",
              "fedmedian", "fedtrimmedavg", "krum")
OPTIMIZERS = ("adam", "sgd", "adamw")
DEVICES = ("auto", "cpu", "cuda")
PRIVACY_MODES = ("none", "dp_sgd", "client_level")
ACCOUNTANTS = ("prv", "rdp")
CLIPPING_SIDES = ("server", "client")
WIRE_DTYPES = ("float32", "float16")
GRAD_SAMPLE_MODES = ("auto", "output_hooks", "hooks", "functorch", "ghost", "ew")
ACTIVATIONS = ("prelu", "relu", "leakyrelu")
UPSAMPLES = ("deconv", "resize")
NORM_BOUNDS = ("median", "absolute", "none")
OVER_NORM_ACTIONS = ("drop", "clip")
LR_SCHEDULES = ("constant", "cosine", "step")
CLASS_WEIGHTS = ("none", "balanced", "fixed")


class ConfigError(ValueError):
    """A configuration value is missing, misspelled or out of range."""


def _one_of(key: str, value: object, allowed: Sequence[object]) -> None:
    if value not in allowed:
        raise ConfigError(
            f"{key}={value!r} is not valid; allowed values: {', '.join(map(str, allowed))}"
        )


def _positive(key: str, value: float, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{key}={value!r} is not valid; it must be {bound}")


def _fraction(key: str, value: float, *, allow_zero: bool = True) -> None:
    if not (0.0 <= value <= 1.0) or (value == 0.0 and not allow_zero):
        raise ConfigError(f"{key}={value!r} is not valid; it must lie in [0, 1]")


@dataclass
class TaskConfig:
    """What is learned.

    Attributes:
        kind: ``classification`` (one label per image) or ``segmentation``
            (one label per pixel/voxel).
        spatial_dims: 2 for images/slices, 3 for volumes or 3D patches.
        in_channels: image channels (1 for X-ray, CT, single MRI sequence).
        num_classes: classes, background included for segmentation.
        image_size: spatial size every sample is resized/cropped to, in
            pixels (H, W) or voxels (H, W, D).
    """

    kind: str = "classification"
    spatial_dims: int = 2
    in_channels: int = 1
    num_classes: int = 2
    image_size: list[int] = field(default_factory=lambda: [28, 28])

    def __post_init__(self) -> None:
        _one_of("task.kind", self.kind, TASKS)
        _one_of("task.spatial_dims", self.spatial_dims, (2, 3))
        _positive("task.in_channels", self.in_channels)
        if self.num_classes < 2:
            raise ConfigError(f"task.num_classes={self.num_classes} is not valid; it must be >= 2")
        if len(self.image_size) != self.spatial_dims or min(self.image_size) < 8:
            raise ConfigError(
                f"task.image_size={list(self.image_size)} is not valid; it needs "
                f"{self.spatial_dims} sizes, each >= 8"
            )


@dataclass
class ModelConfig:
    """Which MONAI network, and its width.

    Attributes:
        name: a classifier (cnn, densenet121, resnet18, resnet34) or a
            segmenter (unet, basicunet, attentionunet, segresnet).
        channels: feature channels per resolution level (cnn, unet,
            attentionunet; the first entry sets basicunet/segresnet width).
        dropout: dropout probability.
        init_weights: a weights file that initialises the global model of a
            fresh run (never a resumed one): a MedFed run's
            ``final_model.pt``/``best_model.pt``, a PyTorch state dict, a
            checkpoint dict holding one (``state_dict``, ``model``,
            ``weights``, ...) or a MONAI bundle's ``models/model.pt``. Tensors
            whose names and shapes match are loaded, the rest keep their
            seeded initial values (report: ``transfer.json``). null = none.
        freeze: parameter names kept at the global values while hospitals
            train the first ``freeze_rounds`` rounds: prefixes (``features``
            covers ``features.conv0.weight``) or glob patterns (``*.bias``).
        freeze_rounds: rounds (1-based, from round 1) in which ``freeze``
            applies; must be >= 1 when ``freeze`` is set.
        act: activation of cnn and unet: ``prelu`` (MONAI's default; Opacus
            has no per-sample-gradient rule for it), ``relu`` or ``leakyrelu``
            (no parameters, no per-sample gradients).
        upsample: unet up-sampling: ``deconv`` (MONAI's transposed
            convolution) or ``resize`` (nearest-neighbour resize, then a 3x3
            convolution: MONAI's ``UpSample`` in ``nontrainable`` mode).
    """

    name: str = "cnn"
    channels: list[int] = field(default_factory=lambda: [16, 32, 64])
    dropout: float = 0.0
    init_weights: str | None = None
    freeze: list[str] = field(default_factory=list)
    freeze_rounds: int = 0
    act: str = "prelu"
    upsample: str = "deconv"

    def __post_init__(self) -> None:
        _one_of("model.name", self.name, CLASSIFIERS + SEGMENTERS)
        _one_of("model.act", self.act, ACTIVATIONS)
        _one_of("model.upsample", self.upsample, UPSAMPLES)
        if not self.channels or min(self.channels) < 1:
            raise ConfigError(f"model.channels={list(self.channels)} must be positive integers")
        _fraction("model.dropout", self.dropout)
        if self.init_weights is not None and not str(self.init_weights).strip():
            raise ConfigError("model.init_weights is empty; give a weights file or null")
        if any(not str(p).strip() for p in self.freeze):
            raise ConfigError(f"model.freeze={list(self.freeze)} has an empty pattern")
        _positive("model.freeze_rounds", self.freeze_rounds, allow_zero=True)
        if self.freeze and self.freeze_rounds < 1:
            raise ConfigError(f"model.freeze={list(self.freeze)} needs model.freeze_rounds >= 1 "
                              "(the first rounds in which those layers stay frozen)")


@dataclass
class DataConfig:
    """Where each hospital's images come from and how they are split.

    Attributes:
        source: ``synthetic`` (built-in, seeded, no download), ``medmnist``
            (a MedMNIST ``.npz``) or ``folder`` (a hospital's own files).
        path: the ``.npz`` file (medmnist), or the data folder (folder).
            For a natural split, ``path`` holds one sub-folder per hospital.
        split: how one pooled dataset is divided among hospitals: ``iid``,
            ``dirichlet`` label skew, or ``natural`` (one folder per hospital).
        dirichlet_alpha: concentration of the label skew; smaller = more skew.
        labels_csv: CSV (columns ``image,label``) for folder classification,
            relative to the folder.
        volume_mode: how 3D volumes are used: 2D ``slices``, 3D ``patches``,
            or whole resized ``volume``.
        slice_axis: axis of a RAS-oriented volume that slices are taken along
            (2 = axial).
        spacing: voxel size in mm every volume is resampled to after
            reorientation (e.g. [2, 2, 2]); null keeps each file's own grid.
        slice_block: neighbouring 2D slices of a volume assigned to the same
            split together (bigger = less leakage between near-identical
            neighbours, but whole anatomical regions held out).
        min_foreground: for segmentation slices, the least fraction of mask
            pixels a slice needs to be kept (0 keeps every slice).
        samples_per_hospital: synthetic images generated per hospital.
        val_fraction: share of each hospital's samples held out for
            validation (federated evaluation).
        test_fraction: share held out as that hospital's test split when the
            source has none of its own.
        batch_size: samples per training step.
        num_workers: DataLoader worker processes.
        central_test: evaluate the global model on the source's held-out test
            set on the server each round (if the source has one).
        hospitals: the hospitals that take part, as 0-based indices into
            the ``federation.num_hospitals`` partitions of the data; null =
            all. The data is divided exactly as with all of them, so the
            others' splits are unchanged and a hospital left out
            (leave-one-hospital-out) has none of its images in any split
            used (simulation: one SuperNode per listed hospital).
    """

    source: str = "synthetic"
    path: str | None = None
    split: str = "iid"
    dirichlet_alpha: float = 0.5
    labels_csv: str = "labels.csv"
    volume_mode: str = "slices"
    slice_axis: int = 2
    spacing: list[float] | None = None
    slice_block: int = 8
    min_foreground: float = 0.0
    samples_per_hospital: int = 256
    val_fraction: float = 0.15
    test_fraction: float = 0.2
    batch_size: int = 32
    num_workers: int = 0
    central_test: bool = True
    hospitals: list[int] | None = None

    def __post_init__(self) -> None:
        _one_of("data.source", self.source, DATA_SOURCES)
        if self.hospitals is not None and (not self.hospitals or min(self.hospitals) < 0
                                           or len(set(self.hospitals)) < len(self.hospitals)):
            raise ConfigError(f"data.hospitals={self.hospitals} must be distinct hospital "
                              "indices >= 0 (at least one), or null for all")
        _one_of("data.split", self.split, SPLITS)
        _one_of("data.volume_mode", self.volume_mode, VOLUME_MODES)
        _one_of("data.slice_axis", self.slice_axis, (0, 1, 2))
        if self.spacing is not None and (len(self.spacing) != 3 or min(self.spacing) <= 0):
            raise ConfigError(f"data.spacing={self.spacing} must be 3 positive sizes in mm")
        if self.source != "synthetic" and not self.path:
            raise ConfigError(f"data.path must be set when data.source={self.source!r}")
        _positive("data.dirichlet_alpha", self.dirichlet_alpha)
        _positive("data.samples_per_hospital", self.samples_per_hospital)
        _positive("data.batch_size", self.batch_size)
        _positive("data.slice_block", self.slice_block)
        _positive("data.num_workers", self.num_workers, allow_zero=True)
        _fraction("data.min_foreground", self.min_foreground)
        _fraction("data.val_fraction", self.val_fraction)
        _fraction("data.test_fraction", self.test_fraction)
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ConfigError("data.val_fraction + data.test_fraction must be < 1")


@dataclass
class TrainConfig:
    """Local training at each hospital.

    Attributes:
        optimizer: adam, adamw or sgd.
        lr: learning rate.
        weight_decay: L2 penalty.
        momentum: SGD momentum.
        device: ``auto`` (CUDA when present), ``cpu`` or ``cuda``.
        amp: mixed precision on CUDA (ignored on CPU).
        lr_schedule: learning rate across server rounds (every hospital
            computes the same value from the round number; constant within
            a round): ``constant``, ``cosine`` (from ``lr`` down to
            ``lr x min_lr_factor`` at the last round) or ``step`` (x
            ``step_gamma`` every ``step_rounds`` rounds).
        warmup_rounds: rounds of linear warm-up before the schedule
            (round r <= warmup_rounds trains at ``lr x r / (warmup_rounds + 1)``).
        min_lr_factor: cosine: the last round's lr as a fraction of ``lr``.
        step_rounds: step: rounds between two decays.
        step_gamma: step: the factor of each decay.
        class_weights: the classification loss's class weights: ``none``,
            ``balanced`` (N / (K x N_k) from the hospital's own training
            labels, computed locally; refused under DP-SGD since the counts
            are private) or ``fixed`` (``fixed_class_weights``).
        fixed_class_weights: one weight per class for ``class_weights=fixed``.
    """

    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    device: str = "auto"
    amp: bool = False
    lr_schedule: str = "constant"
    warmup_rounds: int = 0
    min_lr_factor: float = 0.1
    step_rounds: int = 10
    step_gamma: float = 0.5
    class_weights: str = "none"
    fixed_class_weights: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        _one_of("train.optimizer", self.optimizer, OPTIMIZERS)
        _one_of("train.device", self.device, DEVICES)
        _positive("train.lr", self.lr)
        _positive("train.weight_decay", self.weight_decay, allow_zero=True)
        _one_of("train.lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _positive("train.warmup_rounds", self.warmup_rounds, allow_zero=True)
        _fraction("train.min_lr_factor", self.min_lr_factor)
        _positive("train.step_rounds", self.step_rounds)
        _fraction("train.step_gamma", self.step_gamma, allow_zero=False)
        _one_of("train.class_weights", self.class_weights, CLASS_WEIGHTS)
        if self.class_weights == "fixed" and (not self.fixed_class_weights
                                              or min(self.fixed_class_weights) <= 0):
            raise ConfigError("train.fixed_class_weights must list one positive weight per "
                              "class when train.class_weights=fixed")


@dataclass
class StrategyConfig:
    """The Flower strategy that aggregates the hospitals' weights.

    Attributes:
        name: fedavg, fedprox, fedadam, fedyogi, fedadagrad, fedavgm,
            fedmedian, fedtrimmedavg or krum.
        proximal_mu: FedProx proximal term weight.
        server_lr: server learning rate (eta) of FedAdam/FedYogi/FedAdagrad,
            and of FedAvgM.
        server_momentum: FedAvgM momentum.
        tau: adaptivity of FedAdam/FedYogi/FedAdagrad.
        trim_beta: fraction trimmed at each end by FedTrimmedAvg (at least
            one hospital per end whenever 3 or more replies are aggregated).
        num_malicious: hospitals Krum assumes may be byzantine.
        norm_bound: bound on each hospital's update (its weights minus the
            global weights, L2 norm over all float arrays): ``median`` =
            ``norm_factor`` x the round's (lower) median update norm (with
            3 or more updates; none with fewer),
            ``absolute`` = ``max_update_norm``, ``none`` = unbounded.
        norm_factor: multiple of the median norm an update may reach.
        max_update_norm: the absolute L2 bound (``norm_bound=absolute``).
        over_norm: what happens to an update over the bound: ``drop`` it
            (logged) or ``clip`` it to the bound (logged).
        min_cosine: the update that agrees least with the others is
            dropped when its cosine similarity with every other update of
            the round is below this (at most one per round, needs 3+
            updates); null switches the check off.
        max_weight_share: the largest share of a round's total weight
            (``num-examples``) one hospital may have; larger claims are
            capped (logged). 1 switches the cap off.
    """

    name: str = "fedavg"
    proximal_mu: float = 0.01
    server_lr: float = 0.01
    server_momentum: float = 0.9
    tau: float = 1e-3
    trim_beta: float = 0.2
    num_malicious: int = 0
    norm_bound: str = "median"
    norm_factor: float = 4.0
    max_update_norm: float = 0.0
    over_norm: str = "drop"
    min_cosine: float | None = -0.1
    max_weight_share: float = 0.5

    def __post_init__(self) -> None:
        _one_of("strategy.name", self.name, STRATEGIES)
        _positive("strategy.proximal_mu", self.proximal_mu, allow_zero=True)
        _positive("strategy.server_lr", self.server_lr)
        _fraction("strategy.trim_beta", self.trim_beta)
        if self.trim_beta >= 0.5:
            raise ConfigError("strategy.trim_beta must be < 0.5")
        _one_of("strategy.norm_bound", self.norm_bound, NORM_BOUNDS)
        _one_of("strategy.over_norm", self.over_norm, OVER_NORM_ACTIONS)
        if self.norm_factor < 1.0:
            raise ConfigError(f"strategy.norm_factor={self.norm_factor!r} is not valid; it "
                              "must be >= 1 (a multiple of the median update norm)")
        _positive("strategy.max_update_norm", self.max_update_norm, allow_zero=True)
        if self.norm_bound == "absolute" and self.max_update_norm <= 0:
            raise ConfigError("strategy.max_update_norm must be > 0 when "
                              "strategy.norm_bound=absolute")
        if self.min_cosine is not None and not -1.0 <= self.min_cosine <= 1.0:
            raise ConfigError(f"strategy.min_cosine={self.min_cosine!r} is not valid; it "
                              "must lie in [-1, 1], or be null to switch the check off")
        _fraction("strategy.max_weight_share", self.max_weight_share, allow_zero=False)


@dataclass
class PrivacyConfig:
    """Differential privacy.

    Attributes:
        mode: ``none``, ``dp_sgd`` (sample-level DP-SGD at each hospital with
            Opacus) or ``client_level`` (Flower's DP wrappers, one clipped and
            noised update per hospital).
        target_epsilon: epsilon each hospital should reach at the end of the
            planned training; used when ``noise_multiplier`` is null.
        delta: the delta of the (epsilon, delta) guarantee.
        noise_multiplier: fixed noise multiplier (std of the noise relative
            to the clipping norm); null = calibrate to ``target_epsilon``.
        max_grad_norm: per-sample gradient clipping norm (L2).
        accountant: ``prv`` (tight) or ``rdp``.
        clipping_norm: client-level DP: L2 clip of each hospital's update.
        client_noise_multiplier: client-level DP noise multiplier.
        clipping_side: client-level DP: clip on the ``server`` or ``client``.
        ledger_dir: folder of the simulated hospitals' privacy ledgers; empty
            = ``<run_dir>/privacy-ledgers`` (a fresh ledger per run). A
            deployed hospital sets its own ``ledger-path`` in its node config.
        grad_sample_mode: how DP-SGD gets per-sample gradient norms (Opacus):
            ``output_hooks`` (Opacus' per-layer rules fed by hooks on layer
            outputs, with a leaner optimizer step: client/output_hooks.py),
            ``hooks``, ``functorch``, ``ghost`` (fast gradient clipping: two
            backward passes, no stored per-sample gradients), ``ew``
            (PyTorch expanded weights) or ``auto`` (the fastest measured for
            the network, see ``client/dp_sgd.py``). All are exact.
        max_physical_batch: DP-SGD: the most samples one forward/backward pass
            takes; a larger Poisson batch is processed in chunks with one
            (noised, accounted) step per logical batch. null or 0 = no limit.
    """

    mode: str = "none"
    target_epsilon: float = 8.0
    delta: float = 1e-5
    noise_multiplier: float | None = None
    max_grad_norm: float = 1.0
    accountant: str = "prv"
    clipping_norm: float = 1.0
    client_noise_multiplier: float = 0.5
    clipping_side: str = "server"
    ledger_dir: str = ""
    grad_sample_mode: str = "auto"
    max_physical_batch: int | None = 0

    def __post_init__(self) -> None:
        _one_of("privacy.mode", self.mode, PRIVACY_MODES)
        _one_of("privacy.grad_sample_mode", self.grad_sample_mode, GRAD_SAMPLE_MODES)
        if self.max_physical_batch is not None:
            _positive("privacy.max_physical_batch", self.max_physical_batch, allow_zero=True)
        _one_of("privacy.accountant", self.accountant, ACCOUNTANTS)
        _one_of("privacy.clipping_side", self.clipping_side, CLIPPING_SIDES)
        _positive("privacy.target_epsilon", self.target_epsilon)
        if not (0.0 < self.delta < 1.0):
            raise ConfigError(f"privacy.delta={self.delta!r} must lie in (0, 1)")
        if self.noise_multiplier is not None:
            _positive("privacy.noise_multiplier", self.noise_multiplier)
        _positive("privacy.max_grad_norm", self.max_grad_norm)
        _positive("privacy.clipping_norm", self.clipping_norm)
        _positive("privacy.client_noise_multiplier", self.client_noise_multiplier,
                  allow_zero=True)


@dataclass
class FederationConfig:
    """Who takes part and how often.

    Attributes:
        num_hospitals: hospitals (simulated SuperNodes, or expected nodes).
        rounds: federated rounds.
        local_epochs: passes over the local training split per round.
        fraction_train: share of hospitals sampled for training each round.
        min_train: the fewest hospitals a training round may use; a round
            with fewer successful replies fails the run.
        fraction_evaluate: share of hospitals sampled for evaluation.
        min_evaluate: the fewest hospitals an evaluation round needs.
        num_cpus: CPU cores per simulated hospital (Ray resources).
        num_gpus: GPU share per simulated hospital (fractions allowed).
        parallel_hospitals: at least this many simulated hospitals train at
            the same time, sharing cores when the machine has fewer (Ray is
            given max(parallel_hospitals x num_cpus, cores) CPUs); 0 leaves
            Flower's default of one hospital per ``num_cpus`` cores. With 3
            hospitals on 2 cores, 3 avoids a round of two waves.
        round_timeout_s: seconds the server waits for the hospitals' replies
            in each phase (train, evaluate) of a round; then the round goes
            on with those that answered (a training round still needs
            ``min_train`` of them). A straggler's late reply is discarded.
        ray_address: simulation only: the address of an existing Ray cluster
            (``HOST:PORT`` of its head, or ``auto``) on which the simulated
            hospitals run; null = Flower starts a local Ray of its own.
        wire_dtype: the float type of the hospitals' training replies:
            ``float32`` (the model's) or ``float16`` (half the bytes; see
            :mod:`common.wire_dtype`).
    """

    num_hospitals: int = 3
    rounds: int = 3
    local_epochs: int = 1
    fraction_train: float = 1.0
    min_train: int = 2
    fraction_evaluate: float = 1.0
    min_evaluate: int = 2
    num_cpus: int = 1
    num_gpus: float = 0.0
    parallel_hospitals: int = 0
    round_timeout_s: float = 600.0
    ray_address: str | None = None
    wire_dtype: str = "float32"

    def __post_init__(self) -> None:
        _positive("federation.round_timeout_s", self.round_timeout_s)
        _one_of("federation.wire_dtype", self.wire_dtype, WIRE_DTYPES)
        if self.ray_address is not None and not self.ray_address.strip():
            raise ConfigError("federation.ray_address='' is not valid; give HOST:PORT of a "
                              "Ray head, 'auto', or null for a local Ray")
        _positive("federation.num_hospitals", self.num_hospitals)
        _positive("federation.rounds", self.rounds)
        _positive("federation.local_epochs", self.local_epochs)
        _fraction("federation.fraction_train", self.fraction_train, allow_zero=False)
        _fraction("federation.fraction_evaluate", self.fraction_evaluate)
        _positive("federation.num_cpus", self.num_cpus)
        _positive("federation.num_gpus", self.num_gpus, allow_zero=True)
        _positive("federation.parallel_hospitals", self.parallel_hospitals, allow_zero=True)
        for key, value in (("min_train", self.min_train), ("min_evaluate", self.min_evaluate)):
            if not 1 <= value <= self.num_hospitals:
                raise ConfigError(
                    f"federation.{key}={value} is not valid; it must lie in "
                    f"[1, federation.num_hospitals={self.num_hospitals}]"
                )


@dataclass
class PersonaliseConfig:
    """Personalisation after federated training: local fine-tuning at each hospital.

    Attributes:
        epochs: epochs each hospital fine-tunes the final (validation-selected
            when there is one) global model on its own training split; 0 = off.
        lr: fine-tuning learning rate; null = ``train.lr``.
        patience: epochs without a lower validation loss before the
            fine-tuning stops early; the epoch with the lowest validation
            loss is kept (the global model itself if none beats it).
        freeze: parameter names (prefixes or glob patterns) kept at the
            global values while fine-tuning, e.g. the feature extractor to
            tune only the head; empty = tune everything.
        timeout_s: seconds the server waits for the hospitals' replies.
    """

    epochs: int = 0
    lr: float | None = None
    patience: int = 2
    freeze: list[str] = field(default_factory=list)
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        _positive("personalise.epochs", self.epochs, allow_zero=True)
        if self.lr is not None:
            _positive("personalise.lr", self.lr)
        _positive("personalise.patience", self.patience)
        if any(not str(p).strip() for p in self.freeze):
            raise ConfigError(f"personalise.freeze={list(self.freeze)} has an empty pattern")
        _positive("personalise.timeout_s", self.timeout_s)


SELECTION_METRICS = ("loss", "auc", "accuracy", "sensitivity", "specificity", "dice", "hd95")
LOWER_IS_BETTER = ("loss", "hd95")


@dataclass
class SelectionConfig:
    """Which global model is kept: the best on the hospitals' validation splits.

    Attributes:
        metric: validation metric, weighted over hospitals by their validation
            examples; ``loss`` and ``hd95`` are minimised, the others maximised.
        every: hospitals score the global model on their validation split every
            ``every`` rounds (and in the last round).
        patience: stop after this many validated rounds without improvement
            (0 = never stop early).
    """

    metric: str = "loss"
    every: int = 1
    patience: int = 0

    def __post_init__(self) -> None:
        _one_of("selection.metric", self.metric, SELECTION_METRICS)
        _positive("selection.every", self.every)
        _positive("selection.patience", self.patience, allow_zero=True)

    @property
    def minimise(self) -> bool:
        """Whether a lower value of :attr:`metric` is better."""
        return self.metric in LOWER_IS_BETTER

    def due(self, server_round: int, rounds: int) -> bool:
        """Whether hospitals validate in ``server_round`` (1-based) of ``rounds``."""
        return server_round % self.every == 0 or server_round >= rounds


@dataclass
class AugmentConfig:
    """Random training-time augmentation (MONAI transforms), training splits only.

    Validation and test images are never augmented. Each transform fires
    with its own probability per sample; images and masks move together
    (masks with nearest-neighbour interpolation). Image intensities are in
    [0, 1] after loading, so shifts and noise are in those units.

    Attributes:
        enabled: augment training samples at all.
        affine_prob: probability of a random affine per sample.
        rotate_deg: largest rotation, degrees (about every axis in 3D).
        scale: largest zoom in or out, as a fraction (0.1 = 0.9x to 1.1x).
        translate: largest shift, as a fraction of the image size per axis.
        intensity_prob: probability of an intensity scale, and (separately)
            of an intensity shift.
        intensity_scale: largest relative intensity scaling (x (1 +- s)).
        intensity_shift: largest intensity offset.
        gamma_prob: probability of a contrast (gamma) change.
        gamma: gamma range [low, high].
        noise_prob: probability of additive Gaussian noise.
        noise_std: largest noise standard deviation.
        blur_prob: probability of a Gaussian blur.
        blur_sigma: blur sigma range [low, high] in pixels.
        flip_axes: spatial axes (0-based) flipped with probability 0.5 each;
            empty by default (a chest X-ray's heart is on the left).
    """

    enabled: bool = True
    affine_prob: float = 0.5
    rotate_deg: float = 10.0
    scale: float = 0.1
    translate: float = 0.05
    intensity_prob: float = 0.5
    intensity_scale: float = 0.1
    intensity_shift: float = 0.05
    gamma_prob: float = 0.3
    gamma: list[float] = field(default_factory=lambda: [0.8, 1.25])
    noise_prob: float = 0.2
    noise_std: float = 0.02
    blur_prob: float = 0.2
    blur_sigma: list[float] = field(default_factory=lambda: [0.25, 0.75])
    flip_axes: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        for key in ("affine_prob", "intensity_prob", "gamma_prob", "noise_prob", "blur_prob",
                    "scale", "translate", "intensity_scale"):
            _fraction(f"augment.{key}", getattr(self, key))
        if not 0.0 <= self.rotate_deg <= 180.0:
            raise ConfigError(f"augment.rotate_deg={self.rotate_deg!r} must lie in [0, 180]")
        _positive("augment.intensity_shift", self.intensity_shift, allow_zero=True)
        _positive("augment.noise_std", self.noise_std, allow_zero=True)
        for key in ("gamma", "blur_sigma"):
            low_high = list(getattr(self, key))
            if len(low_high) != 2 or not 0 < low_high[0] <= low_high[1]:
                raise ConfigError(f"augment.{key}={low_high} must be [low, high] with "
                                  "0 < low <= high")
        if any(a not in (0, 1, 2) for a in self.flip_axes):
            raise ConfigError(f"augment.flip_axes={list(self.flip_axes)} must be spatial "
                              "axes 0, 1 or 2")


@dataclass
class EvaluationConfig:
    """How test figures are reported: the decision threshold and confidence intervals.

    Attributes:
        threshold: how the probability threshold for class 1 (two classes) is
            chosen on the pooled validation splits of the selected model:
            ``youden`` (maximises sensitivity + specificity - 1),
            ``sensitivity`` (the highest threshold whose validation
            sensitivity reaches ``target_sensitivity``) or ``fixed``
            (``fixed_threshold``, not chosen on data).
        target_sensitivity: the sensitivity ``threshold=sensitivity`` aims at, in (0, 1].
        fixed_threshold: the threshold ``threshold=fixed`` uses, in (0, 1).
        bootstrap: resamples of each percentile bootstrap interval (0 = no intervals).
        confidence: coverage of the intervals, in (0, 1) (0.95: 95 % intervals).
    """

    threshold: str = "youden"
    target_sensitivity: float = 0.9
    fixed_threshold: float = 0.5
    bootstrap: int = 500
    confidence: float = 0.95

    def __post_init__(self) -> None:
        _one_of("evaluation.threshold", self.threshold, THRESHOLD_METHODS)
        if not 0.0 < self.target_sensitivity <= 1.0:
            raise ConfigError(f"evaluation.target_sensitivity={self.target_sensitivity} must "
                              "be in (0, 1]")
        if not 0.0 < self.fixed_threshold < 1.0:
            raise ConfigError(f"evaluation.fixed_threshold={self.fixed_threshold} must be "
                              "in (0, 1)")
        _positive("evaluation.bootstrap", self.bootstrap, allow_zero=True)
        if not 0.0 < self.confidence < 1.0:
            raise ConfigError(f"evaluation.confidence={self.confidence} must be in (0, 1)")


@dataclass
class Settings:
    """One experiment: everything the server and the hospitals need to agree on.

    Attributes:
        name: the experiment's name (shown in logs and the run folder).
        seed: seed of data generation, splits, sampling and initial weights.
        run_dir: where the server writes the run folder (absolute path).
        resume: continue from the checkpoint in ``run_dir`` if there is one.
        tracking: where per-round per-hospital scalars are also logged:
            ``tensorboard`` (event files under ``run_dir/tensorboard``),
            ``mlflow`` (a local file store under ``run_dir/mlruns``) or ``none``.
    """

    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    personalise: PersonaliseConfig = field(default_factory=PersonaliseConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    tracking: str = "tensorboard"
    name: str = "default"
    seed: int = 0
    run_dir: str = "runs/default"
    resume: bool = False

    def __post_init__(self) -> None:
        _one_of("tracking", self.tracking, TRACKERS)
        models = CLASSIFIERS if self.task.kind == "classification" else SEGMENTERS
        _one_of(f"model.name (for task.kind={self.task.kind})", self.model.name, models)
        if self.data.split == "natural" and self.data.source != "folder":
            raise ConfigError(
                "data.split=natural needs data.source=folder (one folder per hospital)")
        if self.privacy.mode == "dp_sgd" and self.strategy.name == "fedprox":
            raise ConfigError(
                "strategy.name=fedprox cannot be combined with privacy.mode=dp_sgd: DP-SGD "
                "clips per-sample gradients only, so the proximal term would be ignored")
        if self.privacy.mode == "client_level" and self.strategy.name not in ("fedavg", "fedprox"):
            raise ConfigError(
                f"privacy.mode=client_level needs strategy.name fedavg or fedprox (an average "
                f"of clipped updates), not {self.strategy.name!r}")
        if self.data.source == "medmnist" and self.task.kind != "classification":
            raise ConfigError("data.source=medmnist supports task.kind=classification only")
        self._check_taking_part()
        self._check_training()

    def _check_training(self) -> None:
        """Class weights fit the task and privacy mode; flips fit the image's axes."""
        train = self.train
        if train.class_weights != "none" and self.task.kind != "classification":
            raise ConfigError("train.class_weights applies to task.kind=classification (the "
                              "Dice term already balances segmentation); set it to none")
        if train.class_weights == "balanced" and self.privacy.mode == "dp_sgd":
            raise ConfigError("train.class_weights=balanced reads the hospital's label counts "
                              "without noise, outside the DP-SGD guarantee; under "
                              "privacy.mode=dp_sgd use none or fixed (train.fixed_class_weights)")
        if train.class_weights == "fixed" and len(train.fixed_class_weights) != \
                self.task.num_classes:
            raise ConfigError(f"train.fixed_class_weights has {len(train.fixed_class_weights)} "
                              f"weights; task.num_classes={self.task.num_classes}")
        if any(a >= self.task.spatial_dims for a in self.augment.flip_axes):
            raise ConfigError(f"augment.flip_axes={list(self.augment.flip_axes)} names an axis "
                              f"outside task.spatial_dims={self.task.spatial_dims}")

    def _check_taking_part(self) -> None:
        """``data.hospitals`` within the partitions, and enough of them for a round."""
        chosen, fed = self.data.hospitals, self.federation
        if chosen is None:
            return
        if max(chosen) >= fed.num_hospitals:
            raise ConfigError(f"data.hospitals={chosen} names hospital {max(chosen)}, outside "
                              f"federation.num_hospitals={fed.num_hospitals}")
        for key, value in (("min_train", fed.min_train), ("min_evaluate", fed.min_evaluate)):
            if value > len(chosen):
                raise ConfigError(f"federation.{key}={value} exceeds the {len(chosen)} "
                                  f"hospital(s) taking part (data.hospitals={chosen})")


SECTIONS: dict[str, type] = {
    "task": TaskConfig,
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "strategy": StrategyConfig,
    "privacy": PrivacyConfig,
    "federation": FederationConfig,
    "selection": SelectionConfig,
    "personalise": PersonaliseConfig,
    "augment": AugmentConfig,
    "evaluation": EvaluationConfig,
}


def settings_from_dict(raw: dict[str, Any]) -> Settings:
    """Build validated :class:`Settings` from a plain nested dict.

    Raises:
        ConfigError: an unknown key (a typo) or a bad value, naming the key.
    """
    top_keys = {f.name for f in dataclasses.fields(Settings)}
    unknown = sorted(set(raw) - top_keys)
    if unknown:
        raise ConfigError(
            f"unknown config key {unknown[0]!r}; allowed keys: {', '.join(sorted(top_keys))}"
        )
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        section = SECTIONS.get(key)
        if section is None:
            kwargs[key] = value
            continue
        allowed = {f.name for f in dataclasses.fields(section)}
        bad = sorted(set(value) - allowed)
        if bad:
            raise ConfigError(
                f"unknown config key '{key}.{bad[0]}'; allowed keys under {key}: "
                f"{', '.join(sorted(allowed))}"
            )
        kwargs[key] = section(**value)
    return Settings(**kwargs)


def settings_to_json(settings: Settings) -> str:
    """Serialize settings to the JSON string carried in Flower's run config."""
    return json.dumps(dataclasses.asdict(settings), sort_keys=True)


def settings_from_json(text: str) -> Settings:
    """Inverse of :func:`settings_to_json`.

    Raises:
        ConfigError: the text is empty (the app was started without MedFed's
            launcher) or not a valid settings document.
    """
    if not text:
        raise ConfigError(
            "run config 'medfed-config' is empty: start runs with `python simulate.py` "
            "or the `server` command, which fill it in"
        )
    return settings_from_dict(json.loads(text))
