"""The hospital's own policy holds whatever the server sends, and under concurrency.

Replies are produced by MedFed's real ClientApp (through its mods: the guard
outermost) from messages built as a node receives them, and serialized as
Flower puts them on the wire; concurrent runs are real processes on one ledger.
"""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import DEFAULT_TTL, ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict
from flwr.app.message.message import make_message
from flwr.common.serde import message_from_proto, message_to_proto
from torch.utils.data import DataLoader, TensorDataset

from client.__main__ import parse, setup
from client.app import DECLINED, app
from client.dp_round import dp_train_round
from client.dp_sgd import BudgetExceededError, epsilon_spent
from client.hospital import Hospital, hospital_from_node_config
from client.local import site_data
from client.privacy_ledger import PrivacyLedger
from common import wire
from common.config import ModelConfig, PrivacyConfig, Settings, TaskConfig, settings_to_json
from common.models import build_model
from tests.conftest import small_settings

pytestmark = pytest.mark.usefixtures("flower_identity")


def _received(settings: Settings) -> Message:
    """A train message from the server as the hospital's node receives it."""
    weights = build_model(settings.task, settings.model, seed=0).state_dict()
    content = RecordDict({wire.ARRAYS: ArrayRecord(weights),
                          wire.CONFIG: ConfigRecord({wire.SERVER_ROUND: 1})})
    metadata = Metadata(run_id=7, message_id="m-1", src_node_id=1, dst_node_id=3,
                        reply_to_message_id="", group_id="1", created_at=time.time(),
                        ttl=DEFAULT_TTL, message_type="train")
    return make_message(metadata, content)


def _on_the_wire(settings: Settings, node: dict) -> Message:
    """The ClientApp's reply to a train message, as Flower serializes it to the server."""
    context = Context(run_id=7, node_id=3, node_config=node, state=RecordDict(),
                      run_config={wire.RUN_CONFIG_KEY: settings_to_json(settings)})
    reply = app(message=_received(settings), context=context)
    return message_from_proto(message_to_proto(reply))


@pytest.mark.parametrize("mode", ["none", "client_level"])
def test_a_ceiling_declines_rounds_that_are_not_dp_sgd(mode: str, tmp_path: Path) -> None:
    settings = small_settings(tmp_path, f"privacy={mode}")
    ledger = tmp_path / "hospital" / "privacy-ledger.json"
    reply = _on_the_wire(settings, {wire.PARTITION_ID: 0, wire.NUM_PARTITIONS: 3,
                                    wire.MAX_EPSILON: 8.0, wire.LEDGER_PATH: str(ledger)})
    assert reply.has_error() and not reply.has_content()
    assert reply.error.code == DECLINED
    assert f"max-epsilon=8, so it trains only with privacy=dp_sgd; this run has privacy={mode}" \
        in str(reply.error.reason)
    assert not ledger.parent.exists()  # nothing trained, nothing written


def test_dp_sgd_reply_holds_weights_privacy_figures_and_a_fixed_count(tmp_path: Path) -> None:
    """On the wire: the arrays sent back, the privacy figures, N and the hospital's number;
    no loss, no timing, no step count of its own. A server delta of 0.5 is ignored."""
    settings = small_settings(tmp_path, "privacy=dp_sgd", "privacy.noise_multiplier=1.0",
                              "privacy.delta=0.5", "model.channels=[8,16]")
    ledger = tmp_path / "hospital" / "privacy-ledger.json"
    node = {wire.PARTITION_ID: 1, wire.NUM_PARTITIONS: 3, wire.LEDGER_PATH: str(ledger)}
    replies = [_on_the_wire(settings, node) for _ in range(2)]
    sent = _received(settings).content[wire.ARRAYS]
    train_size = len(site_data(settings, hospital_from_node_config(node)).train)  # type: ignore[arg-type]
    for reply in replies:
        assert not reply.has_error()
        assert set(reply.content.keys()) == {wire.ARRAYS, wire.METRICS}
        assert list(reply.content[wire.ARRAYS].keys()) == list(sent.keys())
        metrics = dict(reply.content[wire.METRICS])
        assert set(metrics) == {wire.NUM_EXAMPLES, wire.HOSPITAL, wire.EPSILON, wire.RUN_EPSILON,
                                wire.DELTA, wire.NOISE_MULTIPLIER, wire.SAMPLE_RATE,
                                wire.DP_STEPS}
        assert metrics[wire.NUM_EXAMPLES] == train_size  # N, not what sampling drew
        assert metrics[wire.DELTA] == 1e-5  # the hospital's delta, not the server's 0.5
    # the second reply continues from the ledger's record of the first
    first, second = (reply.content.metric_records[wire.METRICS] for reply in replies)
    assert second[wire.DP_STEPS] == 2 * wire.scalar(first[wire.DP_STEPS])
    ledger_history = PrivacyLedger(ledger).counted(f"{settings.data.source}:synthetic:any-share")
    assert second[wire.EPSILON] == pytest.approx(
        epsilon_spent(ledger_history, delta=1e-5, accountant="prv"))


def test_the_server_can_only_tighten_delta() -> None:
    deployed = hospital_from_node_config({wire.PARTITION_ID: 0, wire.NUM_PARTITIONS: 1,
                                          wire.LEDGER_PATH: "/secure/ledger.json"})
    assert deployed.delta == 1e-5
    assert deployed.accounting_delta(0.5) == 1e-5
    assert deployed.accounting_delta(1e-7) == 1e-7
    simulated = Hospital(index=0, count=3, name="hospital-0")  # Flower's simulation engine
    assert simulated.accounting_delta(1e-6) == 1e-6


def test_a_ceiling_needs_the_hospitals_own_ledger() -> None:
    with pytest.raises(ValueError, match="sets max-epsilon but no ledger-path"):
        hospital_from_node_config({wire.PARTITION_ID: 0, wire.NUM_PARTITIONS: 1,
                                   wire.MAX_EPSILON: 2.0})


def test_the_node_writes_its_policy_with_the_ledger_in_its_own_folder(tmp_path: Path) -> None:
    args = parse(["--insecure", "--superlink", "127.0.0.1:9092", "--name", "site-a",
                  "--partition-id", "0", "--num-partitions", "2", "--max-epsilon", "3",
                  "--home", str(tmp_path / "home")])
    settings, _, home = setup(args)
    config = settings.node_config()
    assert config[wire.LEDGER_PATH] == str(home / "privacy-ledger.json")
    assert config[wire.MAX_DELTA] == 1e-5 and config[wire.MAX_EPSILON] == 3.0
    assert wire.ALLOWED_METRICS not in config  # MedFed's default set
    policy = settings.policy()
    assert "max-epsilon 3 (DP-SGD rounds only)" in policy and "delta 1e-05" in policy
    hospital = hospital_from_node_config(config)
    assert hospital.deployed and hospital.allowed_metrics == wire.DEFAULT_ALLOWED_METRICS


TASK = TaskConfig(kind="classification", image_size=[16, 16])
PRIVACY = PrivacyConfig(mode="dp_sgd", noise_multiplier=1.0)
ROUND = (1.0, 1 / 4, 4)  # 64 images in batches of 16: 4 steps at rate 1/4


def _round_at(ledger_path: Path, run_id: str, ceiling: float, start: object,
              results: object) -> None:
    """One DP-SGD round of run ``run_id`` on the shared ledger, started with the others."""
    model = build_model(TASK, ModelConfig(name="cnn", channels=[8, 16]), seed=0)
    data = TensorDataset(torch.randn(64, 1, 16, 16), torch.randint(0, 2, (64,)))
    start.wait(timeout=120)  # type: ignore[attr-defined]
    try:
        report = dp_train_round(
            model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            loader=DataLoader(data, batch_size=16), task=TASK, device=torch.device("cpu"),
            privacy=PRIVACY, ledger=PrivacyLedger(ledger_path), dataset="site-a",
            run_id=run_id, planned_epochs=1, round_epochs=1, ceiling_epsilon=ceiling)
        results.put((run_id, report.epsilon))  # type: ignore[attr-defined]
    except BudgetExceededError:
        results.put((run_id, None))  # type: ignore[attr-defined]


def test_runs_launched_at_once_never_pass_the_ceiling_together(tmp_path: Path) -> None:
    """Two processes, two runs, one ledger, released at the same moment: each round alone
    fits the ceiling, the two together do not. Exactly one trains (without the reservation
    both would pass the check); the ledger's total stays under the ceiling."""
    one = epsilon_spent([ROUND], delta=PRIVACY.delta, accountant="prv")
    two = epsilon_spent([ROUND, ROUND], delta=PRIVACY.delta, accountant="prv")
    ceiling = (one + two) / 2
    spawn = multiprocessing.get_context("spawn")
    start, results = spawn.Barrier(2), spawn.Queue()
    path = tmp_path / "privacy-ledger.json"
    workers = [spawn.Process(target=_round_at, args=(path, f"run-{i}", ceiling, start, results))
               for i in range(2)]
    for worker in workers:
        worker.start()
    outcomes = dict(results.get(timeout=300) for _ in workers)
    for worker in workers:
        worker.join(timeout=60)
    assert [w.exitcode for w in workers] == [0, 0]
    trained = {run: eps for run, eps in outcomes.items() if eps is not None}
    assert len(trained) == 1 and list(trained.values())[0] == pytest.approx(one)
    ledger = PrivacyLedger(path)
    assert ledger.counted("site-a") == [ROUND] and ledger.reserved("site-a") == []
    assert epsilon_spent(ledger.counted("site-a"), delta=PRIVACY.delta,
                         accountant="prv") <= ceiling


def _image_folder(folder: Path, count: int = 20) -> Path:
    """``count`` real PNG files, image i bright in row i only, with a labels.csv."""
    from PIL import Image

    folder.mkdir(parents=True)
    rows = []
    for i in range(count):
        pixels = np.zeros((28, 28), dtype=np.uint8)
        pixels[i] = 255
        Image.fromarray(pixels).save(folder / f"img{i}.png")
        rows.append(f"img{i}.png,{i % 2}\n")
    (folder / "labels.csv").write_text("image,label\n" + "".join(rows))
    return folder


def _held_out(settings: Settings, hospital: Hospital) -> set[int]:
    """Which images (their bright row) are in ``hospital``'s test split."""
    test = site_data(settings, hospital).test
    return {int(test[i][0][0].mean(dim=1).argmax()) for i in range(len(test))}  # type: ignore[arg-type]


def test_a_deployed_hospital_holds_out_the_same_images_whatever_the_server_sends(
        tmp_path: Path) -> None:
    folder = _image_folder(tmp_path / "site-a")
    node: dict[str, str | int] = {wire.PARTITION_ID: 0, wire.NUM_PARTITIONS: 2,
                                  wire.DATA_PATH: str(folder),
                                  wire.LEDGER_PATH: str(tmp_path / "ledger.json")}
    deployed = hospital_from_node_config(node)
    runs = [small_settings(tmp_path / f"r{i}", *extra) for i, extra in
            enumerate([(), ("seed=5",), ("seed=9", "data.test_fraction=0.5",
                                         "data.val_fraction=0.3", "data.slice_block=2")])]
    held_out = [_held_out(settings, deployed) for settings in runs]
    assert held_out[0] == held_out[1] == held_out[2] and len(held_out[0]) == 4  # 0.2 of 20
    # the same folder split by the server's settings would move images between runs
    by_server = Hospital(index=0, count=2, name="site-a", data_path=str(folder))
    assert len({frozenset(_held_out(settings, by_server)) for settings in runs}) > 1
