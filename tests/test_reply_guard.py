"""Only weights leave a hospital: the guard at the client, the checks at the server."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from client.guard import REFUSED, only_weights_mod
from common import wire
from server.runner import RunFailedError
from simulate import simulate
from tests.conftest import ROOT, small_settings

WEIGHTS = {"conv.weight": torch.ones(2, 3), "conv.bias": torch.zeros(2)}


def _sent(kind: str = "train") -> Message:
    content = RecordDict({wire.ARRAYS: ArrayRecord(WEIGHTS),
                          wire.CONFIG: ConfigRecord({wire.SERVER_ROUND: 1})})
    return Message(content, dst_node_id=3, message_type=kind)


def _handler(reply_content: RecordDict):  # type: ignore[no-untyped-def]
    def handler(msg: Message, _context: Context) -> Message:
        return Message(reply_content, reply_to=msg)
    return handler


def _context() -> Context:
    return Context(run_id=7, node_id=3, node_config={}, state=RecordDict(), run_config={})


def _metrics() -> MetricRecord:
    return MetricRecord({wire.NUM_EXAMPLES: 10.0, wire.TRAIN_LOSS: 0.3})


@pytest.mark.usefixtures("flower_identity")
@pytest.mark.parametrize("content,problem", [
    (RecordDict({wire.ARRAYS: ArrayRecord({**WEIGHTS, "leak": torch.ones(5)}),
                 wire.METRICS: _metrics()}), "extra: ['arrays.leak']"),
    (RecordDict({wire.ARRAYS: ArrayRecord({"conv.weight": torch.full((2, 3), float("nan")),
                                           "conv.bias": torch.zeros(2)}),
                 wire.METRICS: _metrics()}), "non-finite"),
    (RecordDict({wire.ARRAYS: ArrayRecord(WEIGHTS), wire.METRICS: _metrics(),
                 "notes": ConfigRecord({"patient": "Jane Doe, 1961"})}), "'notes' (ConfigRecord)"),
    (RecordDict({wire.ARRAYS: ArrayRecord(WEIGHTS),
                 wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: float("inf")})}), "not a finite"),
])
def test_guard_refuses_anything_but_the_weights(content: RecordDict, problem: str) -> None:
    reply = only_weights_mod(_sent(), _context(), _handler(content))
    assert reply.has_error()
    assert reply.error.code == REFUSED and problem in str(reply.error.reason)


@pytest.mark.usefixtures("flower_identity")
def test_guard_lets_weights_and_scalars_through() -> None:
    content = RecordDict({wire.ARRAYS: ArrayRecord(WEIGHTS), wire.METRICS: _metrics()})
    reply = only_weights_mod(_sent(), _context(), _handler(content))
    assert not reply.has_error()
    evaluation = only_weights_mod(_sent("evaluate"), _context(),
                                  _handler(RecordDict({wire.METRICS: _metrics()})))
    assert not evaluation.has_error()


FAULTY_APP = '''"""A ClientApp whose hospital 0 sends NaN weights and hospital 1 an extra array."""
import torch
from flwr.app import ArrayRecord, Message
from flwr.clientapp import ClientApp

from client import app as medfed

app = ClientApp()  # no guard: it stands for a modified, misbehaving hospital


@app.train()
def train(msg, context):
    reply = medfed.train(msg, context)
    if reply.has_error():  # no held weights without MedFed's mods: the server resends them
        return reply
    arrays = reply.content["arrays"].to_torch_state_dict()
    partition = int(context.node_config["partition-id"])
    if partition == 0:
        first = next(iter(arrays))
        arrays[first] = torch.full_like(arrays[first], float("nan"))
    elif partition == 1:
        arrays["stolen.patient.pixels"] = torch.rand(28, 28)
    reply.content["arrays"] = ArrayRecord(arrays)
    return reply


app.evaluate()(medfed.evaluate)
'''


def _faulty_project(tmp_path: Path) -> Path:
    project = tmp_path / "faultyapp"
    project.mkdir()
    for package in ("common", "server", "client"):
        shutil.copytree(ROOT / package, project / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    (project / "faulty_app.py").write_text(FAULTY_APP)
    pyproject = (ROOT / "pyproject.toml").read_text().replace(
        'clientapp = "client.app:app"', 'clientapp = "faulty_app:app"').replace(
        'fab-include = ["common/**/*.py"', 'fab-include = ["faulty_app.py", "common/**/*.py"')
    (project / "pyproject.toml").write_text(pyproject)
    return project


@pytest.mark.slow
def test_bad_replies_never_reach_the_aggregate_and_the_run_goes_on(tmp_path: Path) -> None:
    settings = small_settings(tmp_path, "federation.rounds=2", "federation.min_train=1")
    summary = simulate(settings, project_dir=_faulty_project(tmp_path))
    assert summary["rounds"] == 2
    rows = [json.loads(line) for line in
            (Path(settings.run_dir) / "metrics.jsonl").read_text().splitlines()]
    errors = [r["error"] for r in rows if "error" in r]
    assert any("non-finite" in e for e in errors)
    assert any("stolen.patient.pixels" in e for e in errors)
    trained = [r for r in rows if r["phase"] == "train" and r["hospital"] != "overall"
               and "error" not in r]
    assert {r["hospital"] for r in trained} == {"hospital-2"}  # only the sound hospital
    # the global model stayed finite throughout
    final = torch.load(Path(settings.run_dir) / "final_model.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in final.values())


@pytest.mark.slow
def test_too_many_bad_replies_stop_the_run(tmp_path: Path) -> None:
    settings = small_settings(tmp_path, "federation.rounds=1", "federation.min_train=2")
    with pytest.raises(RunFailedError, match="only 1 hospital"):
        simulate(settings, project_dir=_faulty_project(tmp_path))
