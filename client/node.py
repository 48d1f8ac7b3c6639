"""A hospital's Flower SuperNode: who it is, how it reaches the server, why it stopped.

The hospital's own settings travel in the SuperNode's node config (a TOML
file passed with ``--node-config``), which the ClientApp reads from
``context.node_config``; the server cannot change them. Reconnecting is
Flower's own: a SuperNode retries with backoff (at most 20 s apart) while
the server is unreachable, for ever unless ``--max-retries`` or
``--max-wait-time`` is given, and resumes when a restarted server is back.
"""

from __future__ import annotations

import json
import re
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL, HEARTBEAT_PATIENCE

from client.hospital import DEFAULT_DELTA, SplitPolicy
from common import wire
from common.processes import free_port

KIT_FILE = "hospital.toml"
"""Startup-folder file naming the hospital and the server it dials."""
NODE_CONFIG_FILE = "node-config.toml"
LEDGER_FILE = "privacy-ledger.json"
"""The hospital's privacy ledger, in its startup folder unless ``--ledger-path`` says."""

NodeConfigValue = str | int | float | bool


class NodeSetupError(ValueError):
    """A hospital's file or setting is missing or wrong (the message says what to do)."""


@dataclass(frozen=True)
class HospitalSettings:
    """What a hospital decides for itself; becomes its node config.

    Attributes:
        name: the hospital's name (``hospital-name``).
        partition_id: its number, 0-based (``partition-id``): which share of a
            pooled or synthetic dataset it holds.
        num_partitions: hospitals in the federation (``num-partitions``).
        data_path: its own data (folder or file); None = the experiment's.
        device: ``auto``, ``cpu`` or ``cuda``; None = the experiment's.
        max_epsilon: the most DP epsilon it will ever spend on its data;
            when set, rounds that are not DP-SGD are declined.
        delta: the delta it accounts at (a smaller server delta tightens it).
        ledger_path: the file recording its privacy spend across runs
            (``python -m client`` always sets one: KIT/privacy-ledger.json).
        allowed_metrics: names of the metrics that may leave; None = what
            MedFed sends (:data:`common.wire.DEFAULT_ALLOWED_METRICS`).
        split: how its own data folder is divided into train/val/test.
    """

    name: str
    partition_id: int
    num_partitions: int
    data_path: str | None = None
    device: str | None = None
    max_epsilon: float | None = None
    delta: float = DEFAULT_DELTA
    ledger_path: str | None = None
    allowed_metrics: tuple[str, ...] | None = None
    split: SplitPolicy = SplitPolicy()

    def __post_init__(self) -> None:
        if not 0 <= self.partition_id < self.num_partitions:
            raise NodeSetupError(f"--partition-id {self.partition_id} must lie in "
                                 f"[0, --num-partitions={self.num_partitions})")
        if self.device not in (None, "auto", "cpu", "cuda"):
            raise NodeSetupError(f"--device {self.device!r}: use auto, cpu or cuda")
        if self.max_epsilon is not None and self.max_epsilon <= 0:
            raise NodeSetupError(f"--max-epsilon {self.max_epsilon} must be > 0")
        if not 0 < self.delta < 1:
            raise NodeSetupError(f"--delta {self.delta} must lie in (0, 1)")
        if self.allowed_metrics is not None and wire.NUM_EXAMPLES not in self.allowed_metrics:
            raise NodeSetupError(f"--allowed-metrics must include {wire.NUM_EXAMPLES} (the "
                                 "server drops replies without it)")

    def node_config(self) -> dict[str, NodeConfigValue]:
        """The node config: only the settings that are set."""
        metrics = ",".join(self.allowed_metrics) if self.allowed_metrics else None
        values: dict[str, NodeConfigValue | None] = {
            wire.HOSPITAL_NAME: self.name, wire.PARTITION_ID: self.partition_id,
            wire.NUM_PARTITIONS: self.num_partitions, wire.DATA_PATH: self.data_path,
            wire.DEVICE: self.device, wire.MAX_EPSILON: self.max_epsilon,
            wire.MAX_DELTA: self.delta, wire.LEDGER_PATH: self.ledger_path,
            wire.ALLOWED_METRICS: metrics, wire.SPLIT_SEED: self.split.seed,
            wire.VAL_FRACTION: self.split.val_fraction,
            wire.TEST_FRACTION: self.split.test_fraction,
            wire.SLICE_BLOCK: self.split.slice_block,
        }
        return {key: value for key, value in values.items() if value is not None}

    def policy(self) -> str:
        """The hospital's privacy policy in one line, for the node's start-up log."""
        ceiling = (f"max-epsilon {self.max_epsilon:g} (DP-SGD rounds only)"
                   if self.max_epsilon is not None else "no epsilon ceiling")
        metrics = (", ".join(self.allowed_metrics) if self.allowed_metrics
                   else "MedFed's default set")
        split = self.split
        return (f"policy: {ceiling}; delta {self.delta:g} (the server can only lower it); "
                f"ledger {self.ledger_path}; metrics allowed to leave: {metrics}; data split "
                f"seed {split.seed}, val {split.val_fraction:g}, test {split.test_fraction:g}")


@dataclass(frozen=True)
class Link:
    """How the SuperNode reaches the coordinating site.

    Attributes:
        superlink: HOST:PORT of the server's SuperLink.
        ca: the federation's CA certificate; None only with ``insecure``.
        key: this hospital's private key (OpenSSH, EC P-384), made at the
            hospital by ``python -m client keygen``.
        max_retries: give up after this many failed connection attempts
            (None = never).
        max_wait_time: give up after this many seconds without the server
            (None = never).
        insecure: no TLS and no key (a test on one machine only); it must be
            asked for: a link without a CA certificate is refused otherwise.
    """

    superlink: str
    ca: Path | None
    key: Path | None
    max_retries: int | None = None
    max_wait_time: float | None = None
    insecure: bool = False

    def __post_init__(self) -> None:
        if self.insecure and (self.ca is not None or self.key is not None):
            raise NodeSetupError("--insecure runs without TLS and without a key: drop it, "
                                 "or drop --ca/--key")
        if not self.insecure and self.ca is None:
            raise NodeSetupError("no CA certificate: pass --kit DIR (the startup folder with "
                                 "ca.crt) or --ca FILE; only a test on one machine may run "
                                 "without TLS, with --insecure")

    def check(self) -> None:
        """Fail with a clear message when a file is missing or is not what it should be.

        Raises:
            NodeSetupError: naming the file and what to do.
        """
        if self.insecure:
            return
        assert self.ca is not None
        for flag, path in (("--ca", self.ca), ("--key", self.key)):
            if path is None or not path.is_file():
                raise NodeSetupError(
                    f"{flag} {path or '(not given)'}: file not found. Use the files of this "
                    "hospital's startup folder (--kit DIR); a hospital makes its key with "
                    "`python -m client keygen --kit DIR`")
        assert self.key is not None
        try:
            x509.load_pem_x509_certificate(self.ca.read_bytes())
        except ValueError:
            raise NodeSetupError(f"--ca {self.ca} is not a PEM certificate (use the "
                                 "startup folder's ca.crt)") from None
        try:
            load_ssh_private_key(self.key.read_bytes(), password=None)
        except ValueError:
            raise NodeSetupError(f"--key {self.key} is not an OpenSSH private key (use the "
                                 "private/NAME.key that keygen wrote, not the .pub)") from None


@dataclass(frozen=True)
class Kit:
    """A hospital's startup folder written by provisioning (it holds no secret).

    Attributes:
        folder: the folder.
        name: the hospital's name.
        superlink: HOST:PORT of the server.
        partition_id: its number.
        num_partitions: hospitals provisioned with it.
        key: its private key file, which the hospital makes itself with
            ``python -m client keygen`` (absent until then).
        ca: the federation's CA certificate.
    """

    folder: Path
    name: str
    superlink: str
    partition_id: int
    num_partitions: int
    key: Path
    ca: Path


def read_kit(folder: Path) -> Kit:
    """Read ``folder/hospital.toml``.

    Raises:
        NodeSetupError: the folder or file is missing or incomplete.
    """
    path = folder / KIT_FILE
    if not path.is_file():
        raise NodeSetupError(f"--kit {folder}: {KIT_FILE} not found; pass the startup folder "
                             "the coordinating site gave this hospital")
    try:
        raw = tomllib.loads(path.read_text())
        return Kit(folder=folder, name=str(raw["hospital-name"]),
                   superlink=str(raw["superlink"]), partition_id=int(raw["partition-id"]),
                   num_partitions=int(raw["num-partitions"]), key=folder / str(raw["key"]),
                   ca=folder / str(raw["ca"]))
    except (KeyError, ValueError, tomllib.TOMLDecodeError) as err:
        raise NodeSetupError(f"{path} is incomplete or damaged ({err}); ask the "
                             "coordinating site for a new startup folder") from None


def write_node_config(values: Mapping[str, NodeConfigValue], path: Path) -> Path:
    """Write the node config as TOML (safe for any path or name, quotes included)."""
    lines = []
    for key, value in values.items():
        text = ("true" if value else "false") if isinstance(value, bool) else json.dumps(value)
        lines.append(f"{key} = {text}")  # JSON strings and numbers are valid TOML
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.write_text("\n".join(lines) + "\n")
    return path


def supernode_argv(link: Link, node_config: Path, *, port: int | None = None,
                   secret_file: Path | None = None) -> list[str]:
    """``flower-supernode`` command line for one hospital.

    ``port`` is the node's local ClientApp runtime port on 127.0.0.1 (each
    node on a machine needs its own; default: a free one). The node runs
    with ``--isolation process``: it starts no ClientApp itself; the
    hospital's runner (:mod:`client.runner`) claims each task, signing its
    claims with the shared secret in ``secret_file``, and runs only approved
    code.
    """
    installed = Path(sys.executable).with_name("flower-supernode")
    binary = str(installed) if installed.exists() else "flower-supernode"
    argv = [binary, "--superlink", link.superlink, "--node-config", str(node_config),
            "--isolation", "process", "--host", "127.0.0.1", "--port", str(port or free_port())]
    if secret_file is not None:
        argv += ["--superexec-auth-secret-file", str(secret_file)]
    if link.max_retries is not None:
        argv += ["--max-retries", str(link.max_retries)]
    if link.max_wait_time is not None:
        argv += ["--max-wait-time", str(link.max_wait_time)]
    if link.ca is None:
        return [*argv, "--insecure"]
    assert link.key is not None
    return [*argv, "--root-certificates", str(link.ca.resolve()),
            "--auth-supernode-private-key", str(link.key.resolve())]


ACTIVATION_REFUSED = re.compile(r"\[code: 2004\]|Failed to activate SuperNode")
"""Flower's answer to a key it does not know, and to a key whose node it counts as online."""
SESSION_STARTED = "SuperNode ID:"
"""What a SuperNode logs once the SuperLink accepted it."""
STALE_SESSION_S = float(HEARTBEAT_PATIENCE * HEARTBEAT_DEFAULT_INTERVAL)
"""How long a SuperLink counts a dead node as online after its last heartbeat (s).

Flower's SuperLink sets ``online_until = last heartbeat + HEARTBEAT_PATIENCE x
interval`` (``sql_linkstate.acknowledge_node_heartbeat``), and the SuperNode
asks for the default interval, 30 s; until then it refuses to activate the
node again with ``[code: 2004]``, as it refuses an unknown key.
"""
STALE_RETRY_S = 3.0
"""Seconds between two starts of the SuperNode while its old session is held."""
STALE_MARGIN_S = 15.0


@dataclass(frozen=True)
class StaleSessionWait:
    """Restart the SuperNode while the SuperLink may still hold this hospital's old session.

    Flower answers a restarted node whose previous session it still counts
    as online exactly as it answers an unregistered key. A node that was
    accepted before (its log in ``home`` shows a session) and is refused
    right away is therefore started again every ``retry_s`` seconds, for up
    to ``limit_s`` seconds (the longest the old session can stay online,
    plus a margin); only then is the key reported as not registered.

    Attributes:
        retry_s: seconds between two attempts.
        limit_s: seconds after the first refusal before giving up.
    """

    retry_s: float = STALE_RETRY_S
    limit_s: float = STALE_SESSION_S + STALE_MARGIN_S

    def applies(self, log_text: str, earlier_log: str) -> bool:
        """Whether this refusal may be a held old session (refused, but accepted before)."""
        return bool(ACTIVATION_REFUSED.search(log_text)) and SESSION_STARTED in earlier_log

    def message(self, name: str, waited_s: float) -> str:
        """What the hospital is told while it waits."""
        return (f"{name}: the coordinating site still holds this hospital's previous session "
                f"(a node that stopped without saying goodbye counts as online for up to "
                f"{STALE_SESSION_S:.0f} s); retrying every {self.retry_s:.0f} s for up to "
                f"{self.limit_s:.0f} s ({waited_s:.0f} s so far)")


REFUSALS = (
    (ACTIVATION_REFUSED,
     "the coordinating site refused this hospital's key: it is not registered (or was "
     "removed), or another node with this key is connected right now. Ask them to run "
     "`python -m server.registry add --certs DIR {name}`"),
    (re.compile(r"\[code: 2001\]"),
     "the coordinating site requires a registered key: start with --kit DIR (or --key)"),
    (re.compile(r"SSL/TLS handshake error|CERTIFICATE_VERIFY_FAILED|certificate verify"),
     "TLS failed: --ca must be the federation's ca.crt and the server address must be one "
     "its certificate names (see `python -m server.provision show`)"),
    (re.compile(r"SuperNode terminated gracefully"),
     "the coordinating site closed this hospital's connection: its key was unregistered "
     "(removed from the federation)"),
    (re.compile(r"Giving up reconnection"),
     "gave up reaching the server (--max-retries / --max-wait-time)"),
)


def refusal(log_text: str, name: str) -> str | None:
    """Why a SuperNode stopped, in the hospital's terms, from the end of its log."""
    for pattern, advice in REFUSALS:
        if pattern.search(log_text):
            return advice.format(name=name)
    return None
