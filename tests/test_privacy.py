"""DP-SGD accounting is exactly cumulative; ceilings hold within and across runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from torch.utils.data import DataLoader, TensorDataset

from client.app import train
from client.dp_sgd import BudgetExceededError, epsilon_spent, start_dp_round
from client.privacy_ledger import LedgerError, PrivacyLedger
from common import wire
from common.config import ModelConfig, PrivacyConfig, TaskConfig, settings_to_json
from common.models import BUILDERS, build_model
from common.training import make_optimizer, train_epochs
from tests.conftest import small_settings

TASK = TaskConfig(kind="classification", image_size=[16, 16])
MODEL = ModelConfig(name="cnn", channels=[8, 16])


def _loader(n: int = 64, batch: int = 16) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, 1, 16, 16, generator=gen), torch.randint(0, 2, (n,)))
    return DataLoader(data, batch_size=batch)


def _round(privacy: PrivacyConfig, history: list, *, prior: list | None = None,
           ceiling: float | None = None, planned_epochs: int = 4):  # type: ignore[no-untyped-def]
    """One round as a fresh process would run it: new model, optimizer and engine."""
    model = build_model(TASK, MODEL, seed=0)
    dp = start_dp_round(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                        loader=_loader(), privacy=privacy, planned_epochs=planned_epochs,
                        round_epochs=1, run_history=history, prior_history=prior or [],
                        ceiling_epsilon=ceiling)
    train_epochs(model, dp.loader, dp.optimizer, task=TASK, epochs=1,
                 device=torch.device("cpu"), on_empty_batch=dp.empty_batch)
    return dp.finish()


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_epsilon_after_round_k_is_one_accountant_over_all_rounds(accountant: str) -> None:
    privacy = PrivacyConfig(mode="dp_sgd", noise_multiplier=1.1, accountant=accountant)
    history: list = []
    reports = []
    for _ in range(3):
        report, history = _round(privacy, history)
        reports.append(report)
    steps_per_round = len(_loader())
    single = epsilon_spent([(1.1, 1 / steps_per_round, 3 * steps_per_round)],
                           delta=privacy.delta, accountant=accountant)
    assert reports[-1].epsilon == pytest.approx(single, rel=1e-6)
    assert reports[-1].steps == 3 * steps_per_round
    per_round = reports[0].epsilon
    assert reports[-1].epsilon > per_round * 1.3  # not the per-round figure
    assert reports[0].epsilon < reports[1].epsilon < reports[2].epsilon


def test_calibrated_noise_meets_the_target_at_the_planned_end() -> None:
    privacy = PrivacyConfig(mode="dp_sgd", target_epsilon=4.0, accountant="prv")
    history: list = []
    for _ in range(4):
        report, history = _round(privacy, history, planned_epochs=4)
    assert report.epsilon <= 4.0
    assert report.epsilon == pytest.approx(4.0, rel=0.02)


def test_prv_is_at_most_rdp_for_the_same_history() -> None:
    history = [(1.0, 1 / 32, 64), (0.8, 1 / 16, 20)]
    prv = epsilon_spent(history, delta=1e-5, accountant="prv")
    rdp = epsilon_spent(history, delta=1e-5, accountant="rdp")
    assert 0 < prv <= rdp
    assert prv > 0.5 * rdp


def test_ceiling_is_never_crossed_within_a_run() -> None:
    privacy = PrivacyConfig(mode="dp_sgd", noise_multiplier=2.0)
    history: list = []
    spent = []
    with pytest.raises(BudgetExceededError, match="above the hospital's ceiling max-epsilon=2.5"):
        for _ in range(20):
            report, history = _round(privacy, history, ceiling=2.5)
            spent.append(report.epsilon)
    assert len(spent) >= 2 and max(spent) <= 2.5
    assert epsilon_spent(history, delta=privacy.delta, accountant="prv") == pytest.approx(spent[-1])


def _settings(tmp_path: Path, *extra: str):  # type: ignore[no-untyped-def]
    return small_settings(tmp_path, "privacy=dp_sgd", "privacy.noise_multiplier=2.0",
                          "data.samples_per_hospital=96", "federation.rounds=3",
                          f"privacy.ledger_dir={tmp_path / 'ledgers'}", *extra)


def _train_message(settings) -> Message:  # type: ignore[no-untyped-def]
    weights = build_model(settings.task, settings.model, seed=0).state_dict()
    content = RecordDict({wire.ARRAYS: ArrayRecord(weights),
                          wire.CONFIG: ConfigRecord({wire.SERVER_ROUND: 1})})
    return Message(content, dst_node_id=11, message_type="train")


@pytest.mark.usefixtures("flower_identity")
def test_ceiling_holds_across_two_runs_on_the_same_ledger(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    node = {wire.PARTITION_ID: 0, wire.NUM_PARTITIONS: 3, wire.MAX_EPSILON: 4.0}
    run_config = {wire.RUN_CONFIG_KEY: settings_to_json(settings)}
    ledger = PrivacyLedger(tmp_path / "ledgers" / "hospital-0.json")
    answered = 0
    for run_id in (101, 102):  # two runs, each with fresh node state
        context = Context(run_id=run_id, node_id=11, node_config=node, state=RecordDict(),
                          run_config=run_config)
        for _ in range(settings.federation.rounds):
            reply = train(_train_message(settings), context)
            if reply.has_error():
                assert "max-epsilon=4" in str(reply.error.reason)
                break
            answered += 1
            assert reply.content[wire.METRICS][wire.EPSILON] <= 4.0
    # the first run fits under the ceiling; the second run is stopped by it
    assert settings.federation.rounds <= answered < 2 * settings.federation.rounds
    (dataset,) = json.loads(ledger.path.read_text())["datasets"]
    total = epsilon_spent(ledger.history(dataset), delta=settings.privacy.delta,
                          accountant="prv")
    assert 0 < total <= 4.0


@pytest.mark.usefixtures("flower_identity")
def test_node_that_lost_its_state_continues_from_the_ledger(tmp_path: Path) -> None:
    """Round 2 after a node restart (empty node state) still counts round 1."""
    settings = _settings(tmp_path)
    node = {wire.PARTITION_ID: 0, wire.NUM_PARTITIONS: 3}
    run_config = {wire.RUN_CONFIG_KEY: settings_to_json(settings)}
    epsilons = []
    for _ in range(2):  # a fresh Context each round: the node's state is gone
        context = Context(run_id=7, node_id=11, node_config=node, state=RecordDict(),
                          run_config=run_config)
        reply = train(_train_message(settings), context)
        epsilons.append(reply.content[wire.METRICS][wire.EPSILON])
    ledger = PrivacyLedger(tmp_path / "ledgers" / "hospital-0.json")
    (dataset,) = json.loads(ledger.path.read_text())["datasets"]
    history = ledger.run_history(dataset, "7")
    assert sum(n for _, _, n in history) == 2 * metrics_steps(reply)
    assert epsilons[1] > epsilons[0]
    assert epsilons[1] == pytest.approx(epsilon_spent(history, delta=settings.privacy.delta,
                                                      accountant=settings.privacy.accountant))


def metrics_steps(reply: Message) -> int:
    """DP-SGD steps of the round a train reply reports."""
    return int(reply.content[wire.METRICS][wire.TRAIN_STEPS])


def test_ledger_never_shortens_a_run(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.json")
    spent = [(1.0, 0.1, 20), (2.0, 0.1, 5)]
    ledger.record("data", "run-1", spent, epsilon=2.0, delta=1e-5, accountant="prv")
    for shorter in ([(1.0, 0.1, 10), (2.0, 0.1, 5)], [(1.0, 0.1, 30)]):
        with pytest.raises(LedgerError, match="run run-1 already has 25 DP-SGD steps"):
            ledger.record("data", "run-1", shorter, epsilon=1.0, delta=1e-5, accountant="prv")
    assert ledger.run_history("data", "run-1") == spent
    longer = [(1.0, 0.1, 20), (2.0, 0.1, 15)]
    ledger.record("data", "run-1", longer, epsilon=3.0, delta=1e-5, accountant="prv")
    assert ledger.run_history("data", "run-1") == longer


def test_concurrent_writers_lose_no_run(tmp_path: Path) -> None:
    """Two processes recording different runs on one ledger at once: both runs kept."""
    import multiprocessing

    path = tmp_path / "ledger.json"
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_record_many, args=(path, f"run-{w}")) for w in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert [w.exitcode for w in workers] == [0, 0]
    ledger = PrivacyLedger(path)
    assert len(ledger.run_history("data", "run-0")) == len(ledger.run_history("data", "run-1"))
    assert len(ledger.history("data")) == 2 * 25


def _record_many(path: Path, run_id: str) -> None:
    ledger = PrivacyLedger(path)
    history: list = []
    for _ in range(25):
        history.append((1.0, 0.1, 1))
        ledger.record("data", run_id, history, epsilon=0.0, delta=1e-5, accountant="prv")


def test_deployed_hospital_ledger_is_keyed_by_its_folder(tmp_path: Path) -> None:
    """The same folder is the same patients, whatever the federation's size or seed."""
    from client.hospital import Hospital
    from client.local import dataset_id

    folder = tmp_path / "images"
    ids = {dataset_id(small_settings(tmp_path, f"federation.num_hospitals={n}", f"seed={seed}"),
                      Hospital(index=i, count=n, name="site", data_path=str(folder)))
           for n, i, seed in ((3, 0, 1), (4, 2, 1), (3, 0, 9))}
    assert ids == {f"folder:{folder.resolve()}"}


def test_interrupted_ledger_write_keeps_the_previous_ledger(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.json")
    ledger.record("data", "run-1", [(1.0, 0.1, 10)], epsilon=1.0, delta=1e-5, accountant="prv")
    before = ledger.path.read_text()

    def crash(*_args: object, **_kwargs: object) -> None:
        raise OSError("power cut")

    monkeypatch.setattr("common.atomic.os.replace", crash)
    with pytest.raises(LedgerError, match="power cut"):
        ledger.record("data", "run-2", [(1.0, 0.1, 99)], epsilon=5.0, delta=1e-5,
                      accountant="prv")
    monkeypatch.undo()
    assert ledger.path.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.json", "ledger.json.lock"]
    assert ledger.history("data") == [(1.0, 0.1, 10)]


def test_corrupt_ledger_is_reported_not_reset(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    path.write_text('{"version": 1, "datasets": {"d": {"runs": ')
    with pytest.raises(LedgerError, match=f"{path}.*cannot be read"):
        PrivacyLedger(path).history("d")
    assert path.read_text().startswith('{"version": 1')


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_dp_sgd_trains_every_model(name: str) -> None:
    kind = "classification" if name in ("cnn", "densenet121", "resnet18", "resnet34") else \
        "segmentation"
    task = TaskConfig(kind=kind, image_size=[32, 32])
    width = [8, 16, 32] if name in ("cnn", "unet", "attentionunet") else [8]
    model = build_model(task, ModelConfig(name=name, channels=width), seed=0)
    x = torch.randn(8, 1, 32, 32)
    y = (torch.randint(0, 2, (8,)) if kind == "classification"
         else torch.randint(0, 2, (8, 1, 32, 32)))
    dp = start_dp_round(model=model, optimizer=make_optimizer(model, small_train()),
                        loader=DataLoader(TensorDataset(x, y), batch_size=4),
                        privacy=PrivacyConfig(mode="dp_sgd", noise_multiplier=1.0),
                        planned_epochs=1, round_epochs=1, run_history=[])
    before = [p.detach().clone() for p in model.parameters()]
    train_epochs(model, dp.loader, dp.optimizer, task=task, epochs=1,
                 device=torch.device("cpu"), on_empty_batch=dp.empty_batch)
    report, _ = dp.finish()
    assert report.steps == 2 and report.epsilon > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_dp_sgd_trains_a_3d_unet() -> None:
    task = TaskConfig(kind="segmentation", spatial_dims=3, image_size=[16, 16, 16])
    model = build_model(task, ModelConfig(name="unet", channels=[4, 8]), seed=0)
    x, y = torch.randn(4, 1, 16, 16, 16), torch.randint(0, 2, (4, 1, 16, 16, 16))
    dp = start_dp_round(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                        loader=DataLoader(TensorDataset(x, y), batch_size=2),
                        privacy=PrivacyConfig(mode="dp_sgd", noise_multiplier=1.0),
                        planned_epochs=1, round_epochs=1, run_history=[])
    train_epochs(model, dp.loader, dp.optimizer, task=task, epochs=1,
                 device=torch.device("cpu"), on_empty_batch=dp.empty_batch)
    assert dp.finish()[0].steps == 2


def small_train():  # type: ignore[no-untyped-def]
    from common.config import TrainConfig
    return TrainConfig(optimizer="sgd", lr=0.05)
