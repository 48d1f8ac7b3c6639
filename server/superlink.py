"""The coordinating site's Flower SuperLink: TLS and SuperNode authentication by default.

The SuperLink serves Flower's Fleet API (hospitals), Control API (Flower's
CLI: registering keys, submitting runs) and Runtime API (the ServerApp) on
one TCP port. :func:`serving` therefore binds it to a loopback port and puts
the Fleet gate (:mod:`server.fleet_gate`) on the public address: from the
network only the Fleet API is reachable; the Control and Runtime APIs only
from this machine. With certificates both run with TLS and the SuperLink
accepts only SuperNodes whose public key was registered; ``certs=None``
means insecure (plain text, any node may join), for tests on one machine only.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import socket
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from common.atomic import atomic_file
from common.folder_lock import locked
from common.processes import ManagedProcess, free_port, running, wait_for_port
from server.pki import certificate_expiry
from server.runner import Connection, flwr_bin

CONNECTION = "medfed"
"""Name of the connection in ``$FLWR_HOME/config.toml`` that MedFed's CLI calls use."""
EXPIRY_WARNING_DAYS = 30
START_TIMEOUT_S = 60.0
PROJECT_DIR = Path(__file__).resolve().parents[1]


class CertificateError(ValueError):
    """A TLS file is missing, expired or does not fit the server."""


@dataclass(frozen=True)
class Certificates:
    """The coordinating site's folder written by ``server.provision`` (``DIR/server``).

    Attributes:
        folder: holds ``ca.crt``, ``server.crt``, ``server.key``,
            ``hospitals/*.pub`` (the hospitals' public keys) and ``state/``
            (the SuperLink's database: registered hospitals, runs).
    """

    folder: Path

    @property
    def ca(self) -> Path:
        """The federation's CA certificate."""
        return self.folder / "ca.crt"

    @property
    def cert(self) -> Path:
        """The SuperLink's certificate."""
        return self.folder / "server.crt"

    @property
    def key(self) -> Path:
        """The SuperLink's private key."""
        return self.folder / "server.key"

    @property
    def state(self) -> Path:
        """Folder of the SuperLink's database and MedFed's record of registrations."""
        return self.folder / "state"

    @property
    def database(self) -> Path:
        """The SuperLink's database: it remembers registered hospitals across restarts."""
        return self.state / "superlink.db"

    @property
    def control_record(self) -> Path:
        """Where a running server records its SuperLink's loopback address and its PID."""
        return self.state / "control.json"

    def hospital_keys(self) -> dict[str, Path]:
        """Hospital name -> public key file, for every ``hospitals/NAME.pub``."""
        return {p.stem: p for p in sorted((self.folder / "hospitals").glob("*.pub"))}

    def check(self, now: dt.datetime | None = None) -> list[str]:
        """Check the TLS files; returns warnings (certificates expiring soon).

        Raises:
            CertificateError: a file is missing or a certificate has expired.
        """
        now = now or dt.datetime.now(dt.UTC)
        warnings = []
        for path in (self.ca, self.cert, self.key):
            if not path.is_file():
                raise CertificateError(
                    f"{path} not found: pass the server/ folder written by "
                    "`python -m server.provision init` as --certs")
        for path in (self.ca, self.cert):
            expires = certificate_expiry(path)
            if expires <= now:
                raise CertificateError(
                    f"{path} expired on {expires:%Y-%m-%d}: renew it with "
                    "`python -m server.provision renew` (see docs/DEPLOYMENT.md)")
            if expires - now < dt.timedelta(days=EXPIRY_WARNING_DAYS):
                warnings.append(f"{path} expires on {expires:%Y-%m-%d}: renew it soon with "
                                "`python -m server.provision renew`")
        return warnings


def superlink_argv(*, host: str, port: int, certs: Certificates | None,
                   database: Path | None = None) -> list[str]:
    """``flower-superlink`` command line; ``certs=None`` means insecure (no TLS, no auth).

    ``database`` keeps the SuperLink's state (registered hospitals, runs) in a
    file, so a restarted server still knows its hospitals.
    """
    argv = [flwr_bin("flower-superlink"), "--host", host, "--port", str(port),
            "--disable-runtime-dependency-installation"]
    if database is not None:
        argv += ["--database", str(database)]
    if certs is None:
        return [*argv, "--insecure"]
    return [*argv, "--ssl-ca-certfile", str(certs.ca), "--ssl-certfile", str(certs.cert),
            "--ssl-keyfile", str(certs.key), "--enable-supernode-auth"]


def superlink_process(*, host: str, port: int, certs: Certificates | None, database: Path,
                      log_path: Path, flwr_home: Path, hold_fds: Sequence[int] = ()
                      ) -> ManagedProcess:
    """The SuperLink as a managed (not yet started) process logging to ``log_path``.

    ``hold_fds`` (locked descriptors, see :func:`site_locked`) stay open in
    the SuperLink, so its folders stay locked for as long as it runs.
    """
    database.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    argv = superlink_argv(host=host, port=port, certs=certs, database=database)
    return ManagedProcess("superlink", argv, log_path, env={"FLWR_HOME": str(flwr_home)},
                          pass_fds=tuple(hold_fds))


def local_address(host: str, port: int) -> str:
    """Where this machine's Flower CLI reaches a SuperLink listening on ``host:port``."""
    return f"{'127.0.0.1' if host in ('0.0.0.0', '::', '') else host}:{port}"


def connection(*, address: str, certs: Certificates | None) -> Connection:
    """How Flower's CLI on this machine reaches the SuperLink at ``address``."""
    return Connection(name=CONNECTION, address=address,
                      root_certificates=None if certs is None else str(certs.ca.resolve()))


def wait_until_listening(link: ManagedProcess, address: str) -> None:
    """Block until the started SuperLink accepts connections at ``address``.

    Raises:
        RuntimeError: it exited first (its log is quoted).
        TimeoutError: it did not listen within a minute.
    """
    host, _, port = address.rpartition(":")
    wait_for_port(host, int(port), timeout_s=START_TIMEOUT_S, proc=link)


def private_superlink(certs: Certificates, log_path: Path, flwr_home: Path
                      ) -> tuple[ManagedProcess, Connection]:
    """A SuperLink on the site's database that only this machine can reach.

    Used to register hospitals before the public SuperLink starts, so no
    hospital can knock before its key is known (it would be refused and give up).
    """
    port = free_port()
    link = superlink_process(host="127.0.0.1", port=port, certs=certs, database=certs.database,
                             log_path=log_path, flwr_home=flwr_home)
    return link, connection(address=f"127.0.0.1:{port}", certs=certs)


def gate_process(*, host: str, port: int, upstream_port: int, certs: Certificates | None,
                 log_path: Path) -> ManagedProcess:
    """The Fleet gate on ``host:port`` in front of the SuperLink on ``127.0.0.1:upstream_port``."""
    argv = [sys.executable, "-m", "server.fleet_gate", "--listen", f"{host}:{port}",
            "--upstream", f"127.0.0.1:{upstream_port}"]
    argv += ["--insecure"] if certs is None else ["--certs", str(certs.folder)]
    return ManagedProcess("fleet-gate", argv, log_path, cwd=PROJECT_DIR)


def listening(address: str) -> bool:
    """Whether something accepts TCP connections at ``host:port`` right now."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return True
    except OSError:
        return False


def control_address(certs: Certificates, address: str | None = None) -> str | None:
    """The running server's Control API address, or None when no server runs.

    Args:
        certs: the site's folder; the running server's address is read from
            :attr:`Certificates.control_record` (a record whose server process
            is gone, killed without cleaning up, counts as none).
        address: an address to use instead of the record.
    """
    if address is None:
        try:
            record = json.loads(certs.control_record.read_text())
            address, pid = str(record["address"]), int(record["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if not psutil.pid_exists(pid):
            return None
    return address if listening(address) else None


@contextlib.contextmanager
def control_recorded(certs: Certificates | None, address: str) -> Iterator[None]:
    """Record ``address`` as this process' loopback SuperLink while the block runs."""
    if certs is None:
        yield
        return
    certs.state.mkdir(parents=True, exist_ok=True, mode=0o700)
    with atomic_file(certs.control_record, "w") as handle:
        json.dump({"address": address, "pid": os.getpid()}, handle)
    try:
        yield
    finally:
        with contextlib.suppress(OSError, ValueError):
            if json.loads(certs.control_record.read_text()).get("pid") == os.getpid():
                certs.control_record.unlink()


def port_owners(port: int) -> list[str]:
    """``PID N (name)`` of each process of this user listening on TCP ``port``."""
    owners = []
    with contextlib.suppress(psutil.Error):
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port \
                    and conn.pid is not None:
                with contextlib.suppress(psutil.Error):
                    owners.append(f"PID {conn.pid} ({psutil.Process(conn.pid).name()})")
    return sorted(set(owners))


def ensure_free(host: str, port: int) -> None:
    """Fail fast when something already listens on ``host:port``.

    Raises:
        RuntimeError: the port is taken (another server running?); names the
            listening process where this user may see it.
    """
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no obstacle
        try:
            sock.bind((host, port))
        except OSError as err:
            owners = ", ".join(port_owners(port)) or "a process of another user"
            raise RuntimeError(f"cannot listen on {host}:{port}: {err.strerror}, held by "
                               f"{owners} (is another server, or a SuperLink it left, "
                               "running? stop it, or choose another --port)") from None


RUN_LOCK = "server.lock"
"""Lock file in the run folder, held by the server and its SuperLink while they run."""


@contextlib.contextmanager
def site_locked(run_dir: Path, certs: Certificates | None) -> Iterator[tuple[int, ...]]:
    """Hold the run folder (and the site's SuperLink database) for this server alone.

    Yields:
        The locked descriptors, to pass to the SuperLink (``hold_fds``): an
        orphaned SuperLink keeps the folders locked until it exits.

    Raises:
        FolderInUseError: another server, or a SuperLink one left running,
            holds them (the message names its PID).
    """
    with contextlib.ExitStack() as stack:
        fds = [stack.enter_context(locked(run_dir / RUN_LOCK, "a MedFed server runs there"))]
        if certs is not None:
            fds.append(stack.enter_context(locked(
                certs.state / "superlink.lock", "a SuperLink runs on this site's database")))
        yield tuple(fds)


@contextlib.contextmanager
def serving(*, host: str, port: int, certs: Certificates | None, database: Path,
            log_dir: Path, flwr_home: Path, hold_fds: Sequence[int] = ()
            ) -> Iterator[Connection]:
    """Run the SuperLink on a loopback port behind the Fleet gate on ``host:port``.

    Starts the SuperLink (``log_dir/superlink.log``), waits until it listens,
    records its address for ``server.registry``, then starts the gate
    (``log_dir/fleet_gate.log``) and waits until the hospitals' port is open.
    Both are stopped by PID on exit, the gate first. ``hold_fds`` are
    passed to the SuperLink (see :func:`superlink_process`).

    Yields:
        How this machine's Flower CLI reaches the SuperLink's Control API
        (the loopback port; the public port refuses it).

    Raises:
        RuntimeError: ``host:port`` is taken, or one of them exited before
            listening (its log is quoted).
        TimeoutError: one of them did not listen within a minute.
    """
    ensure_free(host, port)
    loopback = free_port()
    link = superlink_process(host="127.0.0.1", port=loopback, certs=certs, database=database,
                             log_path=log_dir / "superlink.log", flwr_home=flwr_home,
                             hold_fds=hold_fds)
    gate = gate_process(host=host, port=port, upstream_port=loopback, certs=certs,
                        log_path=log_dir / "fleet_gate.log")
    conn = connection(address=f"127.0.0.1:{loopback}", certs=certs)
    with running(link):
        wait_until_listening(link, conn.address)
        with control_recorded(certs, conn.address), running(gate):
            wait_until_listening(gate, local_address(host, port))
            yield conn
