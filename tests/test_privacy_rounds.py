"""DP-SGD rounds: cumulative accounting, calibration, ceilings, Poisson batches, usage rules."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from opacus import PrivacyEngine
from torch.utils.data import DataLoader, TensorDataset

from client.accounting import BudgetExceededError, calibrate_noise, epsilon_of
from client.ledger import PrivacyLedger
from client.privacy import DPRound, DPUsageError, PrivacyReport, start_dp_round
from common.config import ModelConfig, PrivacyConfig, TaskConfig
from common.models import build_model

TASK = TaskConfig(kind="classification", image_size=[16, 16])
MODEL = ModelConfig(name="cnn", channels=[8, 16])
State = dict[str, Any]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread (and do not stall on a busy machine)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def dataset(n: int = 64) -> TensorDataset:
    """``n`` random 1x16x16 images with binary labels (seeded)."""
    gen = torch.Generator().manual_seed(n)
    return TensorDataset(torch.randn(n, 1, 16, 16, generator=gen),
                         torch.randint(0, 2, (n,), generator=gen))


def train(dp: DPRound, *, epochs: int = 1) -> int:
    """The plain training loop a caller writes; returns the batches it saw."""
    seen = 0
    for _ in range(epochs):
        for x, y in dp.loader:
            dp.optimizer.zero_grad()
            torch.nn.functional.cross_entropy(dp.model(x), y).backward()
            dp.optimizer.step()
            seen += 1
    return seen


def start(privacy: PrivacyConfig, history: State | None, *, ledger: PrivacyLedger | None = None,
          ceiling: float | None = None, planned_epochs: int = 4, n: int = 64,
          batch: int = 16, max_physical_batch: int | None = None) -> DPRound:
    """Start a round as a fresh process would: new model, optimizer and PrivacyEngine."""
    model = build_model(TASK, MODEL, seed=0)
    return start_dp_round(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
        loader=DataLoader(dataset(n), batch_size=batch), privacy=privacy,
        planned_epochs=planned_epochs, round_epochs=1,
        history=None if history is None else json.loads(json.dumps(history)),
        ceiling_epsilon=ceiling, ledger=ledger, max_physical_batch=max_physical_batch)


def one_round(privacy: PrivacyConfig, history: State | None, **kwargs: Any
              ) -> tuple[PrivacyReport, State]:
    """Start, train one epoch, finish; the state goes through JSON as in context.state."""
    with start(privacy, history, **kwargs) as dp:
        train(dp)
        report, state = dp.finish()
    return report, json.loads(json.dumps(state))


def continuous_epsilon(privacy: PrivacyConfig, *, sigma: float, epochs: int) -> float:
    """Epsilon of one uninterrupted Opacus run of ``epochs`` epochs (no MedFed code)."""
    model = build_model(TASK, MODEL, seed=0)
    engine = PrivacyEngine(accountant=privacy.accountant)
    hooks, optimizer, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
        data_loader=DataLoader(dataset(64), batch_size=16), noise_multiplier=sigma,
        max_grad_norm=privacy.max_grad_norm, poisson_sampling=True, wrap_model=False)
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            if x.shape[0] == 0:  # Opacus' own way: a step over empty per-sample grads
                for p in optimizer.params:
                    p.grad_sample = torch.zeros(0, *p.shape)
            else:
                torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    hooks.cleanup()
    return float(engine.get_epsilon(privacy.delta))


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_epsilon_after_round_k_is_one_accountant_over_rounds_1_to_k(accountant: str) -> None:
    privacy = PrivacyConfig(mode="dp_sgd", noise_multiplier=1.1, accountant=accountant)
    reports, state = [], None
    for _ in range(3):
        report, state = one_round(privacy, state)
        reports.append(report)
    assert [r.rounds for r in reports] == [1, 2, 3]
    assert [r.steps for r in reports] == [4, 8, 12]
    assert reports[-1].epsilon == pytest.approx(
        continuous_epsilon(privacy, sigma=1.1, epochs=3), rel=1e-9)
    assert reports[0].epsilon < reports[1].epsilon < reports[2].epsilon
    assert reports[2].epsilon > 1.3 * reports[0].epsilon  # never the per-round figure
    assert reports[2].run_epsilon == reports[2].epsilon  # no ledger: this run only


@pytest.mark.parametrize(("n", "batch", "rounds"), [(64, 16, 4), (93, 1, 1)])
def test_calibrated_sigma_meets_the_target_at_the_planned_end(n: int, batch: int,
                                                             rounds: int) -> None:
    # 93 batches of 1: Opacus' Poisson loader runs int(1 / (1/93)) = 92 steps an epoch
    privacy = PrivacyConfig(mode="dp_sgd", target_epsilon=3.0, accountant="prv")
    state, sigmas = None, set()
    for _ in range(rounds):
        report, state = one_round(privacy, state, planned_epochs=rounds, n=n, batch=batch)
        sigmas.add(report.noise_multiplier)
    assert len(sigmas) == 1  # the same sigma in every round
    per_epoch = report.steps // rounds
    assert report.noise_multiplier == calibrate_noise(
        target_epsilon=3.0, delta=privacy.delta, sample_rate=1 / (n // batch),
        steps=rounds * per_epoch, accountant="prv")  # deterministic, no memo needed
    assert 3.0 * 0.98 <= report.epsilon <= 3.0


def test_a_round_that_would_cross_the_ceiling_is_refused_before_training() -> None:
    privacy = PrivacyConfig(mode="dp_sgd", noise_multiplier=1.5)
    per_round = (1.5, 1 / 4, 4)
    two, three = (epsilon_of([per_round] * k, delta=privacy.delta, accountant="prv")
                  for k in (2, 3))
    ceiling = (two + three) / 2
    state = None
    for _ in range(2):
        report, state = one_round(privacy, state, ceiling=ceiling)
    assert report.epsilon == pytest.approx(two) and report.epsilon <= ceiling
    model = build_model(TASK, MODEL, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(BudgetExceededError) as refused:
        start_dp_round(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                       loader=DataLoader(dataset(64), batch_size=16), privacy=privacy,
                       planned_epochs=4, round_epochs=1, history=state,
                       ceiling_epsilon=ceiling, ledger=None)
    err = refused.value
    assert err.spent == pytest.approx(two) and err.would_be == pytest.approx(three)
    assert f"ceiling epsilon={ceiling:g}" in str(err) and f"{three:.4f}" in str(err)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model(torch.randn(2, 1, 16, 16)).sum().backward()  # no Opacus hooks were left behind
    assert all(getattr(p, "grad_sample", None) is None for p in model.parameters())


def test_empty_poisson_batches_become_noise_only_steps_the_caller_never_sees() -> None:
    privacy = PrivacyConfig(mode="dp_sgd", noise_multiplier=1.0)
    # sample rate 1/40: about 36 % of the 40 batches of an epoch are empty
    with start(privacy, None, n=40, batch=1, planned_epochs=1) as dp:
        seen = 0
        for x, y in dp.loader:
            assert x.shape[0] > 0
            dp.optimizer.zero_grad()
            torch.nn.functional.cross_entropy(dp.model(x), y).backward()
            dp.optimizer.step()
            seen += 1
        report, _ = dp.finish()
    assert report.steps == 40 > seen  # every step accounted, empty ones included
    assert report.epsilon == epsilon_of([(1.0, 1 / 40, 40)], delta=privacy.delta,
                                        accountant="prv")


def test_a_batch_drawn_but_not_stepped_is_refused() -> None:
    privacy = PrivacyConfig(mode="dp_sgd", noise_multiplier=1.0)
    with start(privacy, None) as dp, pytest.raises(DPUsageError, match="exactly one step"):
        for _batch in dp.loader:
            pass  # a loop that forgets optimizer.step()
    dp = start(privacy, None)
    next(iter(dp.loader))
    with pytest.raises(DPUsageError, match="never stepped|exactly one"):
        dp.finish()
    with pytest.raises(DPUsageError, match="already finished or aborted"):
        dp.finish()


def test_large_batches_come_in_chunks_with_one_privacy_step_per_batch() -> None:
    privacy = PrivacyConfig(mode="dp_sgd", noise_multiplier=1.0)
    with start(privacy, None, max_physical_batch=4) as dp:
        before = [p.detach().clone() for p in dp.model.parameters()]
        sizes = []
        for x, y in dp.loader:
            sizes.append(x.shape[0])
            dp.optimizer.zero_grad()
            torch.nn.functional.cross_entropy(dp.model(x), y).backward()
            dp.optimizer.step()
        report, _ = dp.finish()
    assert max(sizes) <= 4 and len(sizes) > report.steps == 4  # about 16 samples a batch
    assert report.epsilon == epsilon_of([(1.0, 1 / 4, 4)], delta=privacy.delta, accountant="prv")
    assert any(not torch.equal(a, b) for a, b in zip(before, dp.model.parameters(), strict=True))
    with start(privacy, None, max_physical_batch=4) as dp, \
            pytest.raises(DPUsageError, match="chunk 0 of batch 0"):
        for x, _y in dp.loader:  # steps on no chunk
            dp.model(x)


def test_a_round_cannot_train_more_epochs_than_cleared() -> None:
    privacy = PrivacyConfig(mode="dp_sgd", noise_multiplier=1.0)
    with start(privacy, None) as dp:
        assert train(dp, epochs=1) <= dp.max_steps == 4
        with pytest.raises(DPUsageError, match="cleared for 4 DP-SGD steps"):
            train(dp, epochs=1)


def test_state_is_plain_json_and_checked() -> None:
    privacy = PrivacyConfig(mode="dp_sgd", target_epsilon=5.0)
    _, state = one_round(privacy, None)
    assert state["format"] == "medfed-dp-state" and len(state["rounds"]) == 1
    assert state["calibration"]["noise_multiplier"] == state["rounds"][0][0]
    bad_states: list[State] = [{"rounds": []}, {**state, "rounds": [[1.0, 2.0, 3]]},
                               {**state, "rounds": [[0.0, 0.1, 3]]},
                               {**state, "calibration": {"x": 1}}]
    for bad in bad_states:
        with pytest.raises(ValueError, match="history"):
            start(privacy, bad)


def test_bad_arguments_fail_fast() -> None:
    with pytest.raises(ValueError, match="mode='dp_sgd'"):
        start(PrivacyConfig(mode="none"), None)
    with pytest.raises(ValueError, match="planned_epochs=0"):
        start(PrivacyConfig(mode="dp_sgd"), None, planned_epochs=0)
    with pytest.raises(ValueError, match="ceiling_epsilon"):
        start(PrivacyConfig(mode="dp_sgd"), None, ceiling=-1.0)
    with pytest.raises(ValueError, match="max_physical_batch=0"):
        start(PrivacyConfig(mode="dp_sgd"), None, max_physical_batch=0)


def test_prv_is_at_most_rdp_for_the_same_recorded_history() -> None:
    privacy = PrivacyConfig(mode="dp_sgd", noise_multiplier=0.9)
    state = None
    for _ in range(2):
        report, state = one_round(privacy, state)
    assert state is not None
    history = [tuple(m) for m in state["rounds"]]
    prv = epsilon_of(history, delta=privacy.delta, accountant="prv")
    rdp = epsilon_of(history, delta=privacy.delta, accountant="rdp")
    assert prv == report.epsilon
    assert 0.5 * rdp < prv <= rdp
