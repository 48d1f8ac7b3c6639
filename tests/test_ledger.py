"""The privacy ledger: ceilings across runs, atomic writes, corrupt files, reservations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from client.accounting import BudgetExceededError, epsilon_of
from client.ledger import LedgerError, PrivacyLedger
from client.privacy import DPRound
from common.config import PrivacyConfig
from tests.test_privacy_rounds import one_round, one_thread, start, train

__all__ = ["one_thread"]  # the autouse fixture, shared

PRIVACY = PrivacyConfig(mode="dp_sgd", noise_multiplier=1.5, accountant="prv")
FAST = PrivacyConfig(mode="dp_sgd", noise_multiplier=1.5, accountant="rdp")
ROUND = (1.5, 1 / 4, 4)  # one epoch of 64 samples in batches of 16


def eps(rounds: int, *, delta: float = 1e-5, accountant: str = "rdp") -> float:
    return epsilon_of([ROUND] * rounds, delta=delta, accountant=accountant)


def ledger(tmp_path: Path, run_id: str, dataset: str = "hospital-a/chest-xray") -> PrivacyLedger:
    return PrivacyLedger(path=tmp_path / "ledger.json", dataset=dataset, run_id=run_id)


def test_a_ceiling_holds_across_two_runs_on_the_same_data(tmp_path: Path) -> None:
    four, five, one = (eps(k, accountant="prv") for k in (4, 5, 1))
    ceiling = (four + five) / 2  # room for 4 rounds in all
    first = [one_round(PRIVACY, None, ledger=ledger(tmp_path, "run-1"), ceiling=ceiling)]
    for _ in range(2):
        first.append(one_round(PRIVACY, first[-1][1], ledger=ledger(tmp_path, "run-1"),
                               ceiling=ceiling))
    second = [one_round(PRIVACY, None, ledger=ledger(tmp_path, "run-2"), ceiling=ceiling)]
    assert second[0][0].run_epsilon == pytest.approx(one)  # its own round alone
    assert second[0][0].epsilon == pytest.approx(four)  # composed with run 1's three rounds
    with pytest.raises(BudgetExceededError):
        one_round(PRIVACY, second[-1][1], ledger=ledger(tmp_path, "run-2"), ceiling=ceiling)
    with pytest.raises(BudgetExceededError):  # a third run, too
        one_round(PRIVACY, None, ledger=ledger(tmp_path, "run-3"), ceiling=ceiling)
    total = ledger(tmp_path, "x").epsilon(delta=PRIVACY.delta, accountant="prv")
    assert total == pytest.approx(four) and total <= ceiling
    # sequential composition in one accountant beats adding the runs' epsilons
    assert total < first[-1][0].run_epsilon + second[0][0].run_epsilon
    doc = json.loads((tmp_path / "ledger.json").read_text())
    runs = doc["datasets"]["hospital-a/chest-xray"]["runs"]
    assert sorted(runs) == ["run-1", "run-2"]  # refused runs left no trace
    assert [len(r["history"]) for r in runs.values()] == [3, 1]
    assert runs["run-2"]["epsilon"] == pytest.approx(four)


def test_other_datasets_do_not_count(tmp_path: Path) -> None:
    one_round(FAST, None, ledger=ledger(tmp_path, "run-1", dataset="other"))
    report, _ = one_round(FAST, None, ledger=ledger(tmp_path, "run-2"))
    assert report.epsilon == pytest.approx(eps(1))


def test_a_stored_ceiling_applies_without_a_callers_ceiling(tmp_path: Path) -> None:
    ceiling = (eps(1, delta=1e-6) + eps(2, delta=1e-6)) / 2
    ledger(tmp_path, "admin").set_ceiling(epsilon=ceiling, delta=1e-6)
    report, state = one_round(FAST, None, ledger=ledger(tmp_path, "run-1"))
    with pytest.raises(BudgetExceededError, match="delta=1e-06"):
        one_round(FAST, state, ledger=ledger(tmp_path, "run-1"))


def test_runs_training_at_once_see_each_others_reservations(tmp_path: Path) -> None:
    ceiling = (eps(1) + eps(2)) / 2
    busy = start(FAST, None, ledger=ledger(tmp_path, "run-1"), ceiling=ceiling)
    with pytest.raises(BudgetExceededError):  # run-1's round is reserved, not yet finished
        start(FAST, None, ledger=ledger(tmp_path, "run-2"), ceiling=ceiling)
    busy.abort()  # its update never left: the reservation is dropped
    report, _ = one_round(FAST, None, ledger=ledger(tmp_path, "run-2"), ceiling=ceiling)
    assert report.epsilon == pytest.approx(eps(1))


def test_a_reservation_of_a_crashed_round_stays_counted(tmp_path: Path) -> None:
    crashed = start(FAST, None, ledger=ledger(tmp_path, "run-1"))
    train(crashed)  # the process dies here: neither finish() nor abort()
    report, _ = one_round(FAST, None, ledger=ledger(tmp_path, "run-1"))
    assert report.run_epsilon == pytest.approx(eps(1))
    assert report.epsilon == pytest.approx(eps(2))


def test_an_exception_while_training_records_nothing(tmp_path: Path) -> None:
    with pytest.raises(ZeroDivisionError), start(FAST, None, ledger=ledger(tmp_path, "r")):
        raise ZeroDivisionError
    assert ledger(tmp_path, "r").epsilon(delta=1e-5, accountant="rdp") == 0.0


def test_lost_node_state_does_not_reset_a_runs_spend(tmp_path: Path) -> None:
    one_round(FAST, None, ledger=ledger(tmp_path, "run-1"))
    report, state = one_round(FAST, None, ledger=ledger(tmp_path, "run-1"))  # state lost
    assert report.rounds == 2 and report.epsilon == pytest.approx(eps(2))
    assert len(state["rounds"]) == 2


def test_node_state_disagreeing_with_the_ledger_is_refused(tmp_path: Path) -> None:
    _, state = one_round(FAST, None, ledger=ledger(tmp_path, "run-1"))
    state["rounds"][0][2] -= 1
    with pytest.raises(LedgerError, match="disagree"):
        start(FAST, state, ledger=ledger(tmp_path, "run-1"))
    with pytest.raises(ValueError, match="run_id='run-1'"):
        start(FAST, state, ledger=ledger(tmp_path, "run-2"))


@pytest.mark.parametrize("fault", ["os.fsync", "os.replace", "json.dumps"])
def test_an_interrupted_write_leaves_the_previous_ledger(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str) -> None:
    _, state = one_round(FAST, None, ledger=ledger(tmp_path, "run-1"))
    dp: DPRound = start(FAST, state, ledger=ledger(tmp_path, "run-1"))
    train(dp)
    path = tmp_path / "ledger.json"
    before = path.read_bytes()  # round 1 released, round 2 reserved

    def power_cut(*_args: object, **_kwargs: object) -> None:
        raise OSError("power cut")

    monkeypatch.setattr(f"client.atomic_file.{fault}", power_cut)
    with pytest.raises(LedgerError, match=f"{path}.*power cut.*must not be sent"):
        dp.finish()
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.json", "ledger.json.lock"]
    # the unconfirmed round stays counted: the spend is never under-reported
    spent = ledger(tmp_path, "run-1").epsilon(delta=1e-5, accountant="rdp")
    assert spent == pytest.approx(eps(2))


@pytest.mark.parametrize("text", ['{"format": "medfed-privacy-ledger", "version": 1, "datas',
                                  '{"format": "medfed-privacy-ledger", "version": 1, "datasets":'
                                  ' {"d": {"runs": {"r": {"history": [{"status": "released",'
                                  ' "noise_multiplier": -1, "sample_rate": 0.1, "steps": 3}]}}}}}',
                                  "[]", ""])
def test_a_corrupt_ledger_is_reported_never_reset(tmp_path: Path, text: str) -> None:
    path = tmp_path / "ledger.json"
    path.write_text(text)
    with pytest.raises(LedgerError, match=f"privacy ledger {path} .*Restore the file"):
        ledger(tmp_path, "run-1").epsilon(delta=1e-5, accountant="rdp")
    with pytest.raises(LedgerError, match=str(path)):
        start(FAST, None, ledger=ledger(tmp_path, "run-1"))
    assert path.read_text() == text


def test_ledger_identity_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="dataset"):
        PrivacyLedger(path=tmp_path / "l.json", dataset="", run_id="r")
    with pytest.raises(ValueError, match="ceiling"):
        ledger(tmp_path, "r").set_ceiling(epsilon=0.0, delta=1e-5)
