"""What the coordinating site's public port exposes: Flower's Fleet API and nothing else.

A real TLS deployment on loopback (``python -m server`` as a process, the
Fleet gate in front of its SuperLink). An outsider holds the federation's
``ca.crt`` (every hospital has it) and a key of its own that nobody
registered; through the hospitals' address it tries Flower's CLI (list and
register nodes, submit a run) and raw HTTPS calls to the Control and Runtime
APIs (the ServerApp's task claim included). Every attempt is refused by the
gate, the SuperLink never sees them and its state (nodes, runs) is
unchanged; a registered hospital then joins through the same port.
"""

from __future__ import annotations

import json
import re
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.routing import APIRoute
from flwr.proto import control_pb2, runtime_pb2
from flwr.superlink.routers.fleet.router import router as flower_fleet_router
from google.protobuf.message import Message

from client.keys import generate_key_pair
from common.processes import ManagedProcess, free_port, wait_for_port
from server.fleet_gate import FLEET_PATHS, NOT_SERVED
from server.registry import flwr_json
from server.runner import Connection
from server.superlink import control_address, serving
from tests.conftest import ROOT
from tests.test_deployment import Federation, federation, output

__all__ = ["federation"]  # the fixture, imported for pytest

PROTOBUF = {"content-type": "application/protobuf", "accept": "application/protobuf"}
CONTROL_CALLS: dict[str, Message] = {
    "/v1/control/list-nodes": control_pb2.ListNodesRequest(),
    "/v1/control/register-node": control_pb2.RegisterNodeRequest(public_key=b"intruder"),
    "/v1/control/unregister-node": control_pb2.UnregisterNodeRequest(node_id=1),
    "/v1/control/start-run": control_pb2.StartRunRequest(),
    "/v1/control/stop-run": control_pb2.StopRunRequest(run_id=1),
    "/v1/control/list-runs": control_pb2.ListRunsRequest(),
    "/v1/control/stream-logs": control_pb2.StreamLogsRequest(run_id=1),
}
RUNTIME_CALLS: dict[str, Message] = {
    "/v1/runtime/acquire-task": runtime_pb2.AcquireTaskRequest(),  # the ServerApp's claim
    "/v1/runtime/pull-task-input": runtime_pb2.PullTaskInputRequest(),
    "/v1/runtime/get-nodes": runtime_pb2.GetNodesRequest(),
    "/v1/runtime/push-task-output": runtime_pb2.PushTaskOutputRequest(),
}
TRICKS = ["/v1/fleet/../control/list-nodes", "/v1/fleet/%2e%2e/control/list-nodes",
          "/v1/fleet/pull-messages/../../control/list-nodes", "//v1/control/list-nodes",
          "/v1/control/list-nodes?next=/v1/fleet/pull-messages", "/V1/FLEET/PULL-MESSAGES",
          "/v1/fleet/pull-messages/"]
"""Request targets sent byte for byte (httpx would normalise some of them)."""


def test_the_gate_passes_exactly_flowers_fleet_api() -> None:
    """The allow-list is Flower's Fleet router, route for route (caught on a Flower upgrade)."""
    routes = {(method, route.path) for route in flower_fleet_router.routes
              if isinstance(route, APIRoute) for method in route.methods or ()}
    assert routes == {("POST", path) for path in FLEET_PATHS}


def link_state(address: str, ca: Path | None) -> tuple[set[int], set[int]]:
    """(node IDs, run IDs) the SuperLink knows, asked on its loopback Control API."""
    scheme = "https" if ca else "http"
    with httpx.Client(base_url=f"{scheme}://{address}", verify=str(ca) if ca else False,
                      timeout=30, headers=PROTOBUF) as client:
        nodes = client.post("/v1/control/list-nodes", content=b"").raise_for_status()
        runs = client.post("/v1/control/list-runs", content=b"").raise_for_status()
    return ({n.node_id for n in control_pb2.ListNodesResponse.FromString(nodes.content).nodes_info},
            set(control_pb2.ListRunsResponse.FromString(runs.content).run_dict))


def raw_status(port: int, target: str, ca: Path | None) -> int:
    """Status code the gate answers to ``POST target`` sent unmodified over (TLS) TCP."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    if ca is not None:
        sock = ssl.create_default_context(cafile=str(ca)).wrap_socket(
            sock, server_hostname="127.0.0.1")
    with sock:
        sock.sendall(f"POST {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     "Content-Length: 0\r\nConnection: close\r\n\r\n".encode())
        status_line = sock.recv(4096).split(b"\r\n", 1)[0].decode()
    return int(status_line.split()[1])


def refused_everywhere(base: str, ca: Path | None) -> None:
    """Every Control/Runtime call, wrong method and path trick is answered 404 by the gate."""
    with httpx.Client(verify=str(ca) if ca else False, timeout=30) as client:
        for path, request in {**CONTROL_CALLS, **RUNTIME_CALLS}.items():
            answer = client.post(f"{base}{path}", content=request.SerializeToString(),
                                 headers=PROTOBUF)
            assert (answer.status_code, answer.json()) == (404, NOT_SERVED), path
        for method, path in [("GET", "/health"), ("GET", "/docs"), ("GET", "/openapi.json"),
                             ("GET", "/v1/fleet/pull-messages"), ("PUT", "/v1/fleet/push-object"),
                             ("OPTIONS", "/v1/fleet/pull-messages"), ("POST", "/")]:
            assert client.request(method, f"{base}{path}").status_code == 404, (method, path)
    port = int(base.rsplit(":", 1)[1])
    for target in TRICKS:
        assert raw_status(port, target, ca) == 404, target


def started_server(fed: Federation) -> tuple[ManagedProcess, Connection]:
    """``python -m server`` waiting for two hospitals; returns it and its loopback connection."""
    server = fed.server(wait_for=2)  # at most --wait-timeout (300 s): the test stops it first
    deadline = time.monotonic() + 120
    while (address := control_address(fed.certs)) is None:
        assert time.monotonic() < deadline and server.poll() is None, output(server)
        time.sleep(0.5)
    wait_for_port("127.0.0.1", fed.port, timeout_s=60, proc=server)
    return server, Connection("medfed", address, str(fed.certs.ca))


@pytest.mark.slow
def test_an_outsider_with_the_ca_reaches_only_the_fleet_api(federation: Federation) -> None:
    """Through the public port an outsider holding ca.crt lists, registers and submits
    nothing; the SuperLink's nodes and runs are unchanged; site-a joins through the gate
    (a whole run through it: tests/test_deployment.py)."""
    fed = federation
    server, local = started_server(fed)
    before = link_state(local.address, fed.certs.ca)
    assert len(before[0]) == 3 and not before[1]  # the hospitals, registered; no run yet

    outsider, intruder = fed.root / "outsider", fed.root / "intruder.pub"
    intruder.write_bytes(generate_key_pair("intruder")[1])
    public = Connection("outsider", f"127.0.0.1:{fed.port}", str(fed.certs.ca))
    for args in (["supernode", "list"], ["supernode", "register", str(intruder)],
                 ["run", str(ROOT)]):
        answer = flwr_json(args, public, outsider)
        assert not answer["success"], (args, answer)
        assert NOT_SERVED["detail"] in answer["error-message"], (args, answer)
    refused_everywhere(f"https://127.0.0.1:{fed.port}", fed.certs.ca)
    with httpx.Client(verify=str(fed.certs.ca)) as client:  # a Fleet call is forwarded ...
        fleet = client.post(f"https://127.0.0.1:{fed.port}/v1/fleet/register-node",
                             headers=PROTOBUF, content=b"")
        assert fleet.status_code == 401  # ... and Flower refuses an unsigned one

    assert link_state(local.address, fed.certs.ca) == before  # no new node, no run
    link_log = (fed.run_dir / "superlink.log").read_text()
    assert "/v1/control/register-node" not in link_log  # the gate kept them all away
    assert "/v1/control/stop-run" not in link_log and "/v1/control/start-run" not in link_log
    assert "refused POST /v1/runtime/acquire-task" in (fed.run_dir / "fleet_gate.log").read_text()
    fed.hospital("site-a")  # registered: it joins through the same port
    deadline = time.monotonic() + 120
    while "hospitals connected: 1/2 (site-a)" not in output(server):
        assert time.monotonic() < deadline and server.poll() is None, output(server)
        time.sleep(0.5)
    registry = subprocess.run([sys.executable, "-m", "server.registry", "list", "--certs",
                               str(fed.certs.folder)], capture_output=True, text=True,
                              cwd=ROOT, timeout=120, check=True)  # finds the loopback port
    assert re.search(r"site-a +node \d+ +online", registry.stdout), registry.stdout
    assert "no server is running" not in registry.stdout
    server.stop()
    assert not fed.certs.control_record.exists()


@pytest.fixture
def insecure_site(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """An insecure SuperLink behind the gate, as ``python -m server --insecure`` runs them."""
    port = free_port()
    with serving(host="127.0.0.1", port=port, certs=None, database=tmp_path / "link.db",
                 log_dir=tmp_path, flwr_home=tmp_path / "home") as conn:
        yield f"http://127.0.0.1:{port}", f"http://{conn.address}"


@pytest.mark.slow
def test_insecure_mode_has_the_same_gate(insecure_site: tuple[str, str]) -> None:
    """Without TLS the public port refuses the same calls; the loopback port answers them."""
    public, loopback = insecure_site
    refused_everywhere(public, None)
    with httpx.Client() as client:
        direct = client.post(f"{loopback}/v1/control/list-nodes", headers=PROTOBUF,
                             content=control_pb2.ListNodesRequest().SerializeToString())
        assert direct.status_code == 200  # the same request, where the operator sends it
        fleet = client.post(f"{public}/v1/fleet/activate-node", headers=PROTOBUF, content=b"")
        assert fleet.status_code == 401 and "SuperNode" in json.dumps(fleet.json())
