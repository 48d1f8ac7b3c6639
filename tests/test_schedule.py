"""Learning-rate schedules across rounds and class-weighted losses, DP-SGD included."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch.utils.data import ConcatDataset, DataLoader, TensorDataset

from client.dp_sgd import make_private, poisson_loader
from client.hospital import Hospital
from client.local import train_round
from common.config import ConfigError, ModelConfig, TaskConfig, TrainConfig
from common.models import build_model
from common.schedule import epoch_lr, round_lr, set_lr
from common.training import label_counts, loss_class_weights, make_loss, make_optimizer
from tests.conftest import small_settings

TASK = TaskConfig(kind="classification", image_size=[16, 16])
MODEL = ModelConfig(name="cnn", channels=[8, 16])


def test_constant_and_warmup() -> None:
    train = TrainConfig(lr=0.01, warmup_rounds=3)
    assert [round_lr(train, r, 6) for r in range(1, 7)] == pytest.approx(
        [0.0025, 0.005, 0.0075, 0.01, 0.01, 0.01])


def test_cosine_runs_from_lr_to_the_floor() -> None:
    train = TrainConfig(lr=0.01, lr_schedule="cosine", min_lr_factor=0.1, warmup_rounds=1)
    values = [round_lr(train, r, 12) for r in range(1, 13)]
    assert values[0] == pytest.approx(0.005)  # warm-up
    assert values[1] == pytest.approx(0.01) and values[-1] == pytest.approx(0.001)
    middle = 0.001 + 0.009 * 0.5 * (1 + math.cos(math.pi * 0.5))  # round 7: half way 2..12
    assert values[6] == pytest.approx(middle)
    assert all(a > b for a, b in zip(values[1:], values[2:], strict=False))
    assert round_lr(train, 15, 12) == pytest.approx(0.001)  # past the plan: the last value


def test_step_decays_every_step_rounds() -> None:
    train = TrainConfig(lr=0.1, lr_schedule="step", step_rounds=2, step_gamma=0.5)
    assert [round_lr(train, r, 6) for r in range(1, 7)] == pytest.approx(
        [0.1, 0.1, 0.05, 0.05, 0.025, 0.025])
    with pytest.raises(ValueError, match="server_round=0"):
        round_lr(train, 0, 6)


def test_the_baseline_follows_the_round_curve_by_epoch() -> None:
    train = TrainConfig(lr=0.01, lr_schedule="cosine")
    by_epoch = [epoch_lr(train, e, local_epochs=2, rounds=3) for e in range(1, 7)]
    by_round = [round_lr(train, r, 3) for r in (1, 1, 2, 2, 3, 3)]
    assert by_epoch == by_round


def test_bad_schedule_values_name_the_key() -> None:
    with pytest.raises(ConfigError, match="train.lr_schedule"):
        TrainConfig(lr_schedule="linear")
    with pytest.raises(ConfigError, match="train.step_gamma"):
        TrainConfig(step_gamma=0.0)
    with pytest.raises(ConfigError, match="train.fixed_class_weights"):
        TrainConfig(class_weights="fixed")


def test_the_dp_optimizer_trains_at_the_rounds_lr() -> None:
    """The lr set on the optimizer before Opacus wraps it is the one its steps use."""
    model = build_model(TASK, MODEL, seed=0)
    optimizer = make_optimizer(model, TrainConfig(optimizer="sgd", lr=0.5), lr=0.02)
    data = TensorDataset(torch.randn(32, 1, 16, 16), torch.randint(0, 2, (32,)))
    dp = make_private(model=model, optimizer=optimizer,
                      loader=poisson_loader(DataLoader(data, batch_size=8)),
                      noise_multiplier=1.0, max_grad_norm=1.0, accountant="rdp")
    assert [g["lr"] for g in dp.optimizer.param_groups] == [0.02]
    set_lr(dp.optimizer, 0.01)
    assert optimizer.param_groups[0]["lr"] == 0.01  # one set of groups underneath
    dp.finish()


def test_balanced_weights_come_from_the_training_labels() -> None:
    labels = torch.tensor([0] * 30 + [1] * 10)
    data = ConcatDataset([TensorDataset(torch.zeros(30, 1), labels[:30]),
                          TensorDataset(torch.zeros(10, 1), labels[30:])])
    assert label_counts(data, 2).tolist() == [30, 10]
    weights = loss_class_weights(TrainConfig(class_weights="balanced"), TASK, data)
    assert weights is not None
    assert weights.tolist() == pytest.approx([40 / 60, 40 / 20])
    # Weighted over the training labels, each class counts the same in total
    assert float(weights[0] * 30) == pytest.approx(float(weights[1] * 10))
    assert loss_class_weights(TrainConfig(), TASK, data) is None
    fixed = loss_class_weights(TrainConfig(class_weights="fixed", fixed_class_weights=[1, 3]),
                               TASK, data)
    assert fixed is not None and fixed.tolist() == [1.0, 3.0]


def test_the_weighted_loss_is_a_plain_mean_of_weighted_sample_losses() -> None:
    logits = torch.randn(5, 2, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([0, 1, 1, 0, 1])
    weights = torch.tensor([0.5, 2.0])
    per_sample = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    expected = (weights[targets] * per_sample).sum() / 5  # divided by B, as Opacus assumes
    assert float(make_loss(TASK, weights)(logits, targets)) == pytest.approx(float(expected))
    plain = float(make_loss(TASK)(logits, targets))
    assert float(make_loss(TASK, torch.ones(2))(logits, targets)) == pytest.approx(plain)


def test_class_weights_fit_the_task_and_privacy(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="outside the DP-SGD guarantee"):
        small_settings(tmp_path, "privacy=dp_sgd", "train.class_weights=balanced")
    with pytest.raises(ConfigError, match="task.num_classes=2"):
        small_settings(tmp_path, "train.class_weights=fixed", "train.fixed_class_weights=[1]")
    with pytest.raises(ConfigError, match="task.kind=classification"):
        small_settings(tmp_path, "task=segmentation", "model=unet",
                       "train.class_weights=balanced")
    settings = small_settings(tmp_path, "privacy=dp_sgd", "train.class_weights=fixed",
                              "train.fixed_class_weights=[1.0,2.0]")
    assert settings.train.fixed_class_weights == [1.0, 2.0]


@pytest.mark.parametrize("privacy", ["none", "dp_sgd"])
def test_a_round_trains_with_schedule_weights_and_augmentation(privacy: str,
                                                                tmp_path: Path) -> None:
    weighting = "balanced" if privacy == "none" else "fixed"
    fast = ["privacy.noise_multiplier=1.0", "privacy.accountant=rdp"] if privacy != "none" else []
    settings = small_settings(tmp_path, f"privacy={privacy}", *fast, "train.lr_schedule=cosine",
                              "train.warmup_rounds=1", f"train.class_weights={weighting}",
                              "train.fixed_class_weights=[1.0,1.5]", "train.weight_decay=1e-4")
    hospital = Hospital(index=1, count=settings.federation.num_hospitals, name="hospital-1")
    start = build_model(settings.task, settings.model, seed=0).state_dict()
    result = train_round(settings, hospital, start, server_round=2)
    assert result.metrics["num-examples"] > 0
    changed = [not torch.equal(result.weights[k], start[k]) for k in start
               if start[k].is_floating_point()]
    assert any(changed)
    if privacy == "dp_sgd":
        assert result.metrics["epsilon"] > 0
