"""Deployment end to end on loopback: a real server and hospital processes, TLS, registered keys.

Every process is started through :class:`~common.processes.ManagedProcess`
and stopped by PID (with its descendants) in the fixture, also on failure.
Hospitals are started before the server: they wait for it (Flower's own
retry) and keep running across a server restart.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import torch

from client.approval import AppStore, approve_fab
from client.bundle import build_from_source
from client.keys import keygen
from client.node import read_kit
from common.processes import ManagedProcess, free_port
from server.provision import add_key, init
from server.registry import RegistrationError, flwr_json, list_nodes, register_all, remove
from server.runner import Connection
from server.superlink import Certificates, serving
from tests.conftest import ROOT, stop_leftovers

pytestmark = pytest.mark.slow

HOSPITALS = ["site-a", "site-b", "site-c"]
SMALL = ["data.samples_per_hospital=40", "model.channels=[8,16]", "data.batch_size=16",
         "federation.num_hospitals=3"]


def provision(out: Path, address: str, hospitals: list[str]) -> None:
    """The coordinator provisions, each hospital makes its own key in its startup folder
    (``python -m client keygen``), the coordinator takes in the public keys (``add-key``)."""
    init(out, server_address=address, hospitals=hospitals)
    for name in hospitals:
        add_key(out, name, keygen(read_kit(out / "hospitals" / name)))


class Federation:
    """A provisioned federation on loopback whose processes a test starts and stops."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()
        self.deploy = root / "deploy"
        provision(self.deploy, f"127.0.0.1:{self.port}", HOSPITALS)
        self.certs = Certificates(self.deploy / "server")
        self.run_dir = root / "run"
        self.started: list[ManagedProcess] = []
        self.links = contextlib.ExitStack()  # SuperLinks behind their Fleet gate
        self.bundles: dict[Path, bytes] = {}  # app folder -> its bundle, built once
        # the app submitted and approved: a snapshot, so edits to the checkout while a test
        # runs cannot make the server ship code the hospitals did not approve
        self.project = project_copy(root, "medfed")

    def start(self, name: str, argv: list[str]) -> ManagedProcess:
        proc = ManagedProcess(name, argv, self.root / f"{name}.out", cwd=ROOT).start()
        self.started.append(proc)
        return proc

    def server(self, *overrides: str, resume: bool = False, app: Path | None = None,
               wait_for: int = 3) -> ManagedProcess:
        argv = [sys.executable, "-m", "server", "--certs", str(self.certs.folder),
                "--host", "127.0.0.1", "--port", str(self.port), "--wait-for", str(wait_for)]
        argv += ["--resume"] if resume else []
        argv += ["--app", str(app or self.project)]
        return self.start("server", [*argv, f"run_dir={self.run_dir}", *SMALL, *overrides])

    def approve(self, label: str, app: Path | None = None) -> None:
        """The hospital approves the bundle of ``app`` (default: the snapshot of this project),
        as ``python -m client approve --source APP`` does."""
        app = app or self.project
        if app not in self.bundles:
            self.bundles[app] = build_from_source(app)
        approve_fab(AppStore(self.root / f"home-{label}"), self.bundles[app], f"built from {app}")

    def hospital(self, label: str, *extra: str, kit: Path | None = None) -> ManagedProcess:
        """``python -m client`` with a startup folder (default: the one named ``label``),
        after approving this project's bundle."""
        kit = kit or self.deploy / "hospitals" / label
        self.approve(label)
        return self.start(label, [sys.executable, "-m", "client", "--kit", str(kit),
                                  "--home", str(self.root / f"home-{label}"), *extra])

    def rows(self) -> list[dict]:
        path = self.run_dir / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        return [json.loads(line) for line in lines if line.strip()]

    def rounds_done(self) -> list[int]:
        return [r["round"] for r in self.rows() if r["phase"] == "round"]

    def wait_round(self, round_: int, server: ManagedProcess, timeout_s: float = 150) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if round_ in self.rounds_done():
                return
            assert server.poll() is None, f"server exited early:\n{server.tail(40)}"
            time.sleep(0.5)
        raise TimeoutError(f"round {round_} not done in {timeout_s} s:\n{server.tail(20)}")

    def summary(self) -> dict:
        result: dict = json.loads((self.run_dir / "summary.json").read_text())
        return result

    def coordinator(self) -> Connection:
        """The SuperLink on loopback behind the Fleet gate on ``port``, as the server runs
        them; returns the loopback connection (Control API) for this machine's CLI."""
        return self.links.enter_context(serving(
            host="127.0.0.1", port=self.port, certs=self.certs, database=self.certs.database,
            log_dir=self.root, flwr_home=self.root / "link-home"))

    def stop(self) -> None:
        for proc in reversed(self.started):
            proc.stop(grace_s=5)
        self.links.close()


def output(proc: ManagedProcess) -> str:
    return proc.log_path.read_text(errors="replace")


def crash(proc: ManagedProcess) -> None:
    """SIGKILL a process and its descendants by PID: no goodbye to the server."""
    root = psutil.Process(proc.pid)
    for victim in [*root.children(recursive=True), root]:
        with contextlib.suppress(psutil.NoSuchProcess):
            victim.kill()
    proc.wait(timeout_s=10)


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[Federation]:
    fed = Federation(tmp_path)
    try:
        yield fed
    finally:
        fed.stop()
        stop_leftovers(tmp_path)


def test_superlink_refuses_plain_text_and_unregistered_keys(federation: Federation) -> None:
    """TLS on: plain-text CLI and nodes get nowhere. Auth on: only registered keys join;
    a removed key is shut out at once."""
    fed, certs = federation, federation.certs
    home = fed.root / "cli-home"
    conn = fed.coordinator()  # hospitals dial the gate on fed.port; the CLI the loopback port
    assert register_all(certs, conn, home, ["site-a"])[0].startswith("site-a: registered")

    plain_cli = flwr_json(["supernode", "list"], Connection("plain", conn.address), home)
    assert not plain_cli["success"]
    plain = fed.hospital("plain", "--insecure", "--max-retries", "2",
                         kit=fed.deploy / "hospitals" / "site-a")
    stranger = fed.hospital("site-b")  # provisioned, but its key is not registered
    other = fed.root / "other"
    provision(other, f"127.0.0.1:{fed.port}", ["intruder"])
    wrong_ca = fed.hospital("intruder", kit=other / "hospitals" / "intruder")
    member = fed.hospital("site-a")

    assert plain.wait(timeout_s=90) != 0
    assert "gave up reaching the server" in output(plain)
    assert stranger.wait(timeout_s=90) != 0
    assert "refused this hospital's key: it is not registered" in output(stranger)
    assert "Failed to activate SuperNode" in (fed.root / "home-site-b" / "node.log").read_text()
    assert wrong_ca.wait(timeout_s=90) != 0
    assert "TLS failed" in output(wrong_ca)

    site_a = json.loads((certs.state / "registered.json").read_text())["site-a"]["node-id"]
    deadline = time.monotonic() + 60
    while not any(n["node-id"] == site_a and n["status"] == "online"
                  for n in list_nodes(conn, home)):
        assert time.monotonic() < deadline and member.poll() is None, output(member)
        time.sleep(1)
    assert len(list_nodes(conn, home)) == 1  # nobody else got in

    assert "unregistered" in remove(certs, "site-a", conn, home)
    assert member.wait(timeout_s=60) != 0
    assert "its key was unregistered" in output(member)
    retired = certs.folder / "hospitals" / "removed" / "site-a.pub"
    retired.replace(certs.folder / "hospitals" / "site-a.pub")  # put back: still refused
    with pytest.raises(RegistrationError, match="never accepts it again"):
        register_all(certs, conn, home, ["site-a"])
    kit = read_kit(fed.deploy / "hospitals" / "site-a")  # a new key (keygen --force) can join
    add_key(fed.deploy, "site-a", keygen(kit, force=True), replace=True)  # provision rekey
    assert register_all(certs, conn, home, ["site-a"])[0].startswith("site-a: registered as")


def test_three_hospitals_train_over_tls_and_a_stranger_is_refused(
        federation: Federation) -> None:
    """Three registered hospitals (started before the server) train 2 rounds; a node whose
    key was never registered is refused and the run does not notice."""
    fed = federation
    for name in HOSPITALS:
        fed.hospital(name)
    other = fed.root / "other"
    provision(other, f"127.0.0.1:{fed.port}", ["intruder"])
    stranger = fed.hospital("intruder", "--ca", str(fed.certs.ca),
                            kit=other / "hospitals" / "intruder")
    server = fed.server("federation.rounds=2", "federation.min_train=3",
                        "federation.min_evaluate=3")
    assert server.wait(timeout_s=300) == 0, output(server)[-3000:]
    summary = fed.summary()
    assert summary["rounds"] == 2
    assert set(summary["hospitals"]) == {"hospital-0", "hospital-1", "hospital-2"}
    assert all(0 <= m["auc"] <= 1 for m in summary["hospitals"].values())
    assert fed.rounds_done() == [1, 2]
    assert not [r for r in fed.rows() if "error" in r]  # every reply was sound
    # round 2's training messages named the weights each node's state kept since the
    # evaluation of round 1 (client.held_weights), and no node had to ask for them
    overall = [r for r in fed.rows() if r["phase"] == "train" and r["hospital"] == "overall"]
    assert [r["wire-messages-train-digest"] for r in overall] == [0, 3]
    assert [r["wire-messages-train-resent"] for r in overall] == [0, 0]
    assert stranger.wait(timeout_s=30) != 0
    assert "refused this hospital's key" in output(stranger)
    assert "registered as node" in output(server)
    for name in HOSPITALS:  # one task process answered all of a hospital's messages of the run
        log = (fed.root / f"home-{name}" / "node.log").read_text()
        assert len(re.findall(r"runner: task process \d+ started", log)) == 1, log[-3000:]
        assert log.count("handed to task process") == log.count("audit entry") - 1 >= 3


def received(fed: Federation, label: str) -> int:
    """Messages a hospital's node accepted so far (stale ones of a dead run are not)."""
    log = fed.root / f"home-{label}" / "node.log"
    return log.read_text().count("Received successfully") if log.exists() else 0


def test_the_server_restarts_and_a_hospital_crashes(federation: Federation) -> None:
    """The server is stopped after round 1 and resumed from its checkpoint: it runs round 2,
    not round 1 again, and the hospitals, never restarted, reconnect by themselves. site-c
    is then SIGKILLed while it trains: round 2 completes with the other two (min_train=2)
    once Flower misses its heartbeat."""
    fed = federation
    plan = ["federation.rounds=2", "federation.min_train=2", "federation.fraction_evaluate=0"]
    nodes = {name: fed.hospital(name) for name in HOSPITALS}
    server = fed.server(*plan)
    fed.wait_round(1, server)
    server.stop()  # the coordinating site goes down after round 1
    assert fed.rounds_done() == [1]

    resumed = fed.server(*plan, resume=True)
    deadline = time.monotonic() + 150
    while received(fed, "site-c") < 2:  # round 2's training reached site-c
        assert time.monotonic() < deadline and resumed.poll() is None, output(resumed)
        time.sleep(0.2)
    crash(nodes["site-c"])
    assert resumed.wait(timeout_s=200) == 0, output(resumed)[-3000:]
    assert "resuming after round 1 of 2" in output(resumed)
    assert fed.rounds_done() == [1, 2]
    train = [r for r in fed.rows() if r["phase"] == "train"]
    assert [r["round"] for r in train if r["hospital"] == "overall"] == [1, 2]
    assert {r["hospital"] for r in train if r["round"] == 2 and "error" not in r} == {
        "hospital-0", "hospital-1", "overall"}
    site_c = json.loads((fed.certs.state / "registered.json").read_text())["site-c"]["node-id"]
    # Flower noticed the crash; the failure names the node that died, not the SuperLink
    assert any("heartbeat" in r.get("error", "") and str(r.get("node")) == site_c
               for r in train)
    assert fed.summary()["rounds"] == 2
    assert nodes["site-a"].poll() is None and nodes["site-b"].poll() is None
    for name in ("site-a", "site-b"):  # a task process per run: the resumed run is a new one
        log = (fed.root / f"home-{name}" / "node.log").read_text()
        assert len(re.findall(r"runner: task process \d+ started", log)) == 2, log[-3000:]


FAULTY_APP = '''"""MedFed's ClientApp at three hospitals, two of them misbehaving."""
import torch
from flwr.app import Array, ArrayRecord

from client import app as medfed
from client.guard import only_weights_mod
from flwr.clientapp import ClientApp


def _partition(context):
    return int(context.node_config["partition-id"])


def leak_past_the_guard(msg, context, call_next):
    """Hospital 1 was modified to add an array after its guard: the server must drop it."""
    reply = call_next(msg, context)
    if _partition(context) == 1 and not reply.has_error():
        reply.content["arrays"]["stolen.patient.pixels"] = Array(torch.rand(28, 28))
    return reply


app = ClientApp(mods=[leak_past_the_guard, only_weights_mod])


@app.train()
def train(msg, context):
    reply = medfed.train(msg, context)
    if _partition(context) == 0:  # NaN weights: the guard refuses them at the hospital
        arrays = reply.content["arrays"].to_torch_state_dict()
        first = next(iter(arrays))
        arrays[first] = torch.full_like(arrays[first], float("nan"))
        reply.content["arrays"] = ArrayRecord(arrays)
    return reply


app.evaluate()(medfed.evaluate)
'''


def project_copy(root: Path, name: str) -> Path:
    """A copy of this Flower app (its packages and pyproject) in ``root/name``."""
    project = root / name
    for package in ("common", "server", "client"):
        shutil.copytree(ROOT / package, project / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", project / "pyproject.toml")
    return project


def faulty_project(root: Path) -> Path:
    """A copy of this Flower app whose ClientApp is :data:`FAULTY_APP`."""
    project = project_copy(root, "faultyapp")
    (project / "faulty_app.py").write_text(FAULTY_APP)
    pyproject = (ROOT / "pyproject.toml").read_text()
    pyproject = pyproject.replace('clientapp = "client.app:app"', 'clientapp = "faulty_app:app"')
    pyproject = pyproject.replace('fab-include = [', 'fab-include = ["faulty_app.py", ')
    (project / "pyproject.toml").write_text(pyproject)
    return project


def test_bad_replies_never_reach_the_aggregate(federation: Federation) -> None:
    """NaN weights are refused at the hospital by the guard; an array added past the guard
    is dropped by the server; only the sound hospital is averaged in."""
    fed = federation
    project = faulty_project(fed.root)
    for name in HOSPITALS:  # approved: this test is about the guards, not approval
        fed.approve(name, project)
    nodes = {name: fed.hospital(name) for name in HOSPITALS}
    server = fed.server("federation.rounds=1", "federation.min_train=1",
                        "federation.fraction_evaluate=0", app=project)
    assert server.wait(timeout_s=240) == 0, output(server)[-3000:]
    node = {name: r["node-id"] for name, r in
            json.loads((fed.certs.state / "registered.json").read_text()).items()}
    errors = {str(r.get("node")): r["error"] for r in fed.rows() if "error" in r}
    assert "refused by the hospital's guard" in errors[node["site-a"]]
    assert "non-finite" in errors[node["site-a"]]
    assert "reply dropped" in errors[node["site-b"]]
    assert "stolen.patient.pixels" in errors[node["site-b"]]
    trained = {r["hospital"] for r in fed.rows() if r["phase"] == "train" and "error" not in r}
    assert trained == {"hospital-2", "overall"}
    final = torch.load(fed.run_dir / "final_model.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in final.values())
    assert "outgoing reply refused" in (fed.root / "home-site-a" / "node.log").read_text()
    assert all(node.poll() is None for node in nodes.values())


def test_a_hospitals_ceiling_declines_a_run_without_dp_sgd(federation: Federation) -> None:
    """site-a starts with --max-epsilon 1: a privacy=none run is declined there, nothing
    trained, and the reason reaches the server; site-b (no ceiling) trains the round."""
    fed = federation
    capped = fed.hospital("site-a", "--max-epsilon", "1")
    fed.hospital("site-b")
    server = fed.server("federation.rounds=1", "federation.min_train=1",
                        "federation.fraction_evaluate=0", wait_for=2)
    assert server.wait(timeout_s=240) == 0, output(server)[-3000:]
    node = {name: r["node-id"] for name, r in
            json.loads((fed.certs.state / "registered.json").read_text()).items()}
    errors = {str(r.get("node")): r["error"] for r in fed.rows() if "error" in r}
    assert "max-epsilon=1, so it trains only with privacy=dp_sgd; this run has privacy=none" \
        in errors[node["site-a"]]
    trained = {r["hospital"] for r in fed.rows() if r["phase"] == "train" and "error" not in r}
    assert trained == {"hospital-1", "overall"}
    assert "max-epsilon=1" in output(server)  # the server's log names the reason too
    assert "policy: max-epsilon 1 (DP-SGD rounds only); delta 1e-05" in output(capped)
    kit_ledger = fed.deploy / "hospitals" / "site-a" / "privacy-ledger.json"
    assert f"ledger {kit_ledger.resolve()}" in output(capped)
    assert not kit_ledger.exists()  # nothing was trained, so nothing was spent
