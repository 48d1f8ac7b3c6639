"""The coordinating site's Flower SuperLink: TLS and SuperNode authentication by default.

The SuperLink serves Flower's Fleet API (hospitals), Control API (Flower's
CLI: registering keys, submitting runs) and Runtime API (the ServerApp) on
one TCP port. With certificates it runs with TLS and accepts only
SuperNodes whose public key was registered; ``certs=None`` means insecure
(plain text, any node may join), for tests on one machine only.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from common.processes import ManagedProcess, free_port, wait_for_port
from server.pki import certificate_expiry
from server.runner import Connection, flwr_bin

CONNECTION = "medfed"
"""Name of the connection in ``$FLWR_HOME/config.toml`` that MedFed's CLI calls use."""
EXPIRY_WARNING_DAYS = 30
START_TIMEOUT_S = 60.0


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
                      log_path: Path, flwr_home: Path) -> ManagedProcess:
    """The SuperLink as a managed (not yet started) process logging to ``log_path``."""
    database.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    argv = superlink_argv(host=host, port=port, certs=certs, database=database)
    return ManagedProcess("superlink", argv, log_path, env={"FLWR_HOME": str(flwr_home)})


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
