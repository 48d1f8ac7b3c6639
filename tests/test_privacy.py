"""DP-SGD accounting is exactly cumulative; ceilings hold within and across runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from torch.utils.data import DataLoader, TensorDataset

from client.app import train
from client.dp_round import dp_train_round
from client.dp_sgd import BudgetExceededError, PrivacyReport, epsilon_spent
from client.privacy_ledger import LedgerError, PrivacyLedger
from common import wire
from common.config import ModelConfig, PrivacyConfig, TaskConfig, settings_to_json
from common.models import BUILDERS, build_model
from common.training import make_optimizer
from tests.conftest import small_settings

TASK = TaskConfig(kind="classification", image_size=[16, 16])
MODEL = ModelConfig(name="cnn", channels=[8, 16])


def _loader(n: int = 64, batch: int = 16) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, 1, 16, 16, generator=gen), torch.randint(0, 2, (n,)))
    return DataLoader(data, batch_size=batch)


def _round(privacy: PrivacyConfig, ledger: PrivacyLedger, *, run_id: str = "run",
           ceiling: float | None = None, planned_epochs: int = 4) -> PrivacyReport:
    """One round as a fresh process would run it: new model, optimizer and engine."""
    model = build_model(TASK, MODEL, seed=0)
    return dp_train_round(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                          loader=_loader(), task=TASK, device=torch.device("cpu"),
                          privacy=privacy, ledger=ledger, dataset="data", run_id=run_id,
                          planned_epochs=planned_epochs, round_epochs=1,
                          ceiling_epsilon=ceiling)


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_epsilon_after_round_k_is_one_accountant_over_all_rounds(accountant: str,
                                                                  tmp_path: Path) -> None:
    privacy = PrivacyConfig(mode="dp_sgd", noise_multiplier=1.1, accountant=accountant)
    ledger = PrivacyLedger(tmp_path / "ledger.json")
    reports = [_round(privacy, ledger) for _ in range(3)]
    steps_per_round = len(_loader())
    single = epsilon_spent([(1.1, 1 / steps_per_round, 3 * steps_per_round)],
                           delta=privacy.delta, accountant=accountant)
    assert reports[-1].epsilon == pytest.approx(single, rel=1e-6)
    assert reports[-1].steps == 3 * steps_per_round
    per_round = reports[0].epsilon
    assert reports[-1].epsilon > per_round * 1.3  # not the per-round figure
    assert reports[0].epsilon < reports[1].epsilon < reports[2].epsilon
    assert reports[-1].run_epsilon == reports[-1].epsilon  # one run on this ledger
    assert ledger.run_history("data", "run") == [(1.1, 1 / steps_per_round,
                                                  3 * steps_per_round)]
    assert ledger.reserved("data") == []  # every reservation settled


def test_calibrated_noise_meets_the_target_at_the_planned_end(tmp_path: Path) -> None:
    privacy = PrivacyConfig(mode="dp_sgd", target_epsilon=4.0, accountant="prv")
    ledger = PrivacyLedger(tmp_path / "ledger.json")
    for _ in range(4):
        report = _round(privacy, ledger, planned_epochs=4)
    assert report.epsilon <= 4.0
    assert report.epsilon == pytest.approx(4.0, rel=0.02)


def test_prv_is_at_most_rdp_for_the_same_history() -> None:
    history = [(1.0, 1 / 32, 64), (0.8, 1 / 16, 20)]
    prv = epsilon_spent(history, delta=1e-5, accountant="prv")
    rdp = epsilon_spent(history, delta=1e-5, accountant="rdp")
    assert 0 < prv <= rdp
    assert prv > 0.5 * rdp


def test_ceiling_is_never_crossed_within_a_run(tmp_path: Path) -> None:
    privacy = PrivacyConfig(mode="dp_sgd", noise_multiplier=2.0)
    ledger = PrivacyLedger(tmp_path / "ledger.json")
    spent = []
    with pytest.raises(BudgetExceededError, match="above the hospital's ceiling max-epsilon=2.5"):
        for _ in range(20):
            spent.append(_round(privacy, ledger, ceiling=2.5).epsilon)
    assert len(spent) >= 2 and max(spent) <= 2.5
    history = ledger.history("data")
    assert epsilon_spent(history, delta=privacy.delta, accountant="prv") == pytest.approx(spent[-1])
    assert ledger.reserved("data") == []  # the declined round reserved nothing


def _settings(tmp_path: Path, *extra: str):  # type: ignore[no-untyped-def]
    return small_settings(tmp_path, "privacy=dp_sgd", "privacy.noise_multiplier=2.0",
                          "data.samples_per_hospital=96", "federation.rounds=3", *extra)


def _train_message(settings) -> Message:  # type: ignore[no-untyped-def]
    weights = build_model(settings.task, settings.model, seed=0).state_dict()
    content = RecordDict({wire.ARRAYS: ArrayRecord(weights),
                          wire.CONFIG: ConfigRecord({wire.SERVER_ROUND: 1})})
    return Message(content, dst_node_id=11, message_type="train")


@pytest.mark.usefixtures("flower_identity")
def test_ceiling_holds_across_two_runs_with_different_run_dirs(tmp_path: Path) -> None:
    """A deployed hospital's ledger is its own file: runs writing to different run
    folders (and asking for other ledger folders) still add up in it."""
    ledger = PrivacyLedger(tmp_path / "hospital" / "privacy-ledger.json")
    node = {wire.PARTITION_ID: 0, wire.NUM_PARTITIONS: 3, wire.MAX_EPSILON: 4.0,
            wire.LEDGER_PATH: str(ledger.path)}
    answered, settings = 0, None
    for run_id in (101, 102):  # two runs, each with fresh node state and its own folders
        settings = _settings(tmp_path / f"run-{run_id}",
                             f"privacy.ledger_dir={tmp_path / f'server-ledgers-{run_id}'}")
        context = Context(run_id=run_id, node_id=11, node_config=node, state=RecordDict(),
                          run_config={wire.RUN_CONFIG_KEY: settings_to_json(settings)})
        for _ in range(settings.federation.rounds):
            reply = train(_train_message(settings), context)
            if reply.has_error():
                assert "max-epsilon=4" in str(reply.error.reason)
                break
            answered += 1
            assert reply.content[wire.METRICS][wire.EPSILON] <= 4.0
    assert settings is not None
    # the first run fits under the ceiling; the second run is stopped by it
    assert settings.federation.rounds <= answered < 2 * settings.federation.rounds
    (dataset,) = json.loads(ledger.path.read_text())["datasets"]
    assert {run for run in json.loads(ledger.path.read_text())["datasets"][dataset]["runs"]} \
        == {"101", "102"}
    total = epsilon_spent(ledger.history(dataset), delta=1e-5, accountant="prv")
    assert 0 < total <= 4.0
    assert not list(tmp_path.glob("server-ledgers-*")) and not list(tmp_path.glob("run-*/run/p*"))


@pytest.mark.usefixtures("flower_identity")
def test_node_that_lost_its_state_continues_from_the_ledger(tmp_path: Path) -> None:
    """Round 2 after a node restart (empty node state) still counts round 1."""
    settings = _settings(tmp_path, f"privacy.ledger_dir={tmp_path / 'ledgers'}")
    node = {wire.PARTITION_ID: 0, wire.NUM_PARTITIONS: 3}
    run_config = {wire.RUN_CONFIG_KEY: settings_to_json(settings)}
    replies = []
    for _ in range(2):  # a fresh Context each round: the node's state is gone
        context = Context(run_id=7, node_id=11, node_config=node, state=RecordDict(),
                          run_config=run_config)
        replies.append(train(_train_message(settings), context).content[wire.METRICS])
        assert not context.state.config_records  # nothing of the history kept there
    ledger = PrivacyLedger(tmp_path / "ledgers" / "hospital-0.json")
    (dataset,) = json.loads(ledger.path.read_text())["datasets"]
    history = ledger.run_history(dataset, "7")
    assert sum(n for _, _, n in history) == replies[1][wire.DP_STEPS] == \
        2 * replies[0][wire.DP_STEPS]
    assert replies[1][wire.EPSILON] > replies[0][wire.EPSILON]
    assert replies[1][wire.EPSILON] == pytest.approx(epsilon_spent(
        history, delta=settings.privacy.delta, accountant=settings.privacy.accountant))


def _ok(counted: list, planned: list) -> None:
    """A ledger check that refuses nothing."""


def test_a_round_settles_at_most_what_it_reserved(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.json")
    held = ledger.reserve("data", "run-1", [(1.0, 0.1, 20)], check=_ok)
    assert ledger.counted("data") == [(1.0, 0.1, 20)]  # counted before it is settled
    for more in ([(1.0, 0.1, 21)], [(2.0, 0.1, 1)]):
        with pytest.raises(LedgerError, match="more than its reservation"):
            ledger.settle("data", held, more)
    assert ledger.reserved("data") == [(1.0, 0.1, 20)]  # still counted
    ledger.settle("data", held, [(1.0, 0.1, 20)], delta=1e-5, accountant="prv")
    with pytest.raises(LedgerError, match="no open reservation"):
        ledger.settle("data", held, [(1.0, 0.1, 20)])
    assert ledger.run_history("data", "run-1") == [(1.0, 0.1, 20)]
    assert ledger.reserved("data") == []
    released = ledger.reserve("data", "run-1", [(1.0, 0.1, 5)], check=_ok)
    ledger.release("data", released)  # a round that failed before anything left
    assert ledger.counted("data") == [(1.0, 0.1, 20)]


def test_a_refused_reservation_writes_nothing(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.json")
    ledger.settle("data", ledger.reserve("data", "r", [(1.0, 0.1, 3)], check=_ok),
                  [(1.0, 0.1, 3)])
    before = ledger.path.read_text()
    seen: list = []

    def refuse(counted: list, planned: list) -> None:
        seen.append((counted, planned))
        raise BudgetExceededError("no")

    with pytest.raises(BudgetExceededError):
        ledger.reserve("data", "r", [(1.0, 0.1, 4)], check=refuse)
    assert seen == [([(1.0, 0.1, 3)], [(1.0, 0.1, 4)])]
    assert ledger.path.read_text() == before


def test_concurrent_writers_lose_no_run(tmp_path: Path) -> None:
    """Two processes reserving and settling different runs on one ledger at once."""
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
    for run in ("run-0", "run-1"):
        assert ledger.run_history("data", run) == [(1.0, 0.1, 25)]
    assert ledger.reserved("data") == []


def _record_many(path: Path, run_id: str) -> None:
    ledger = PrivacyLedger(path)
    for _ in range(25):
        held = ledger.reserve("data", run_id, [(1.0, 0.1, 1)], check=_ok)
        ledger.settle("data", held, [(1.0, 0.1, 1)])


def test_deployed_hospital_ledger_is_keyed_by_its_folder(tmp_path: Path) -> None:
    """The same folder is the same patients, whatever the federation's size or seed."""
    from client.hospital import Hospital
    from client.local import dataset_id

    folder = tmp_path / "images"
    ids = {dataset_id(small_settings(tmp_path, f"federation.num_hospitals={n}", f"seed={seed}"),
                      Hospital(index=i, count=n, name="site", data_path=str(folder)))
           for n, i, seed in ((3, 0, 1), (4, 2, 1), (3, 0, 9))}
    assert ids == {f"folder:{folder.resolve()}"}


def test_version_1_ledgers_are_read_and_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    path.write_text(json.dumps({"version": 1, "datasets": {"d": {"runs": {
        "old": {"history": [[1.0, 0.1, 10]], "epsilon": 1.0}}}}}))
    ledger = PrivacyLedger(path)
    assert ledger.counted("d") == [(1.0, 0.1, 10)]
    ledger.settle("d", ledger.reserve("d", "new", [(1.0, 0.1, 2)], check=_ok), [(1.0, 0.1, 2)])
    data = json.loads(path.read_text())
    assert data["version"] == 2 and ledger.counted("d") == [(1.0, 0.1, 2), (1.0, 0.1, 10)]


def test_interrupted_ledger_write_keeps_the_previous_ledger(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.json")
    ledger.settle("data", ledger.reserve("data", "run-1", [(1.0, 0.1, 10)], check=_ok),
                  [(1.0, 0.1, 10)])
    before = ledger.path.read_text()

    def crash(*_args: object, **_kwargs: object) -> None:
        raise OSError("power cut")

    monkeypatch.setattr("common.atomic.os.replace", crash)
    with pytest.raises(LedgerError, match="power cut"):
        ledger.reserve("data", "run-2", [(1.0, 0.1, 99)], check=_ok)
    monkeypatch.undo()
    assert ledger.path.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.json", "ledger.json.lock"]
    assert ledger.counted("data") == [(1.0, 0.1, 10)]


def test_corrupt_ledger_is_reported_not_reset(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    path.write_text('{"version": 1, "datasets": {"d": {"runs": ')
    with pytest.raises(LedgerError, match=f"{path}.*cannot be read"):
        PrivacyLedger(path).history("d")
    assert path.read_text().startswith('{"version": 1')


def _dp_round_on(model: torch.nn.Module, task: TaskConfig, loader: DataLoader,
                 ledger: PrivacyLedger) -> PrivacyReport:
    return dp_train_round(model=model, optimizer=make_optimizer(model, small_train()),
                          loader=loader, task=task, device=torch.device("cpu"),
                          privacy=PrivacyConfig(mode="dp_sgd", noise_multiplier=1.0),
                          ledger=ledger, dataset="data", run_id="r", planned_epochs=1,
                          round_epochs=1)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_dp_sgd_trains_every_model(name: str, tmp_path: Path) -> None:
    kind = "classification" if name in ("cnn", "densenet121", "resnet18", "resnet34") else \
        "segmentation"
    task = TaskConfig(kind=kind, image_size=[32, 32])
    width = [8, 16, 32] if name in ("cnn", "unet", "attentionunet") else [8]
    model = build_model(task, ModelConfig(name=name, channels=width), seed=0)
    x = torch.randn(8, 1, 32, 32)
    y = (torch.randint(0, 2, (8,)) if kind == "classification"
         else torch.randint(0, 2, (8, 1, 32, 32)))
    before = [p.detach().clone() for p in model.parameters()]
    report = _dp_round_on(model, task, DataLoader(TensorDataset(x, y), batch_size=4),
                          PrivacyLedger(tmp_path / "ledger.json"))
    assert report.steps == 2 and report.epsilon > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_dp_sgd_trains_a_3d_unet(tmp_path: Path) -> None:
    task = TaskConfig(kind="segmentation", spatial_dims=3, image_size=[16, 16, 16])
    model = build_model(task, ModelConfig(name="unet", channels=[4, 8]), seed=0)
    x, y = torch.randn(4, 1, 16, 16, 16), torch.randint(0, 2, (4, 1, 16, 16, 16))
    report = _dp_round_on(model, task, DataLoader(TensorDataset(x, y), batch_size=2),
                          PrivacyLedger(tmp_path / "ledger.json"))
    assert report.steps == 2


def small_train():  # type: ignore[no-untyped-def]
    from common.config import TrainConfig
    return TrainConfig(optimizer="sgd", lr=0.05)
