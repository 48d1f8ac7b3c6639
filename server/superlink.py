"""The coordinating site's Flower SuperLink: TLS and SuperNode authentication by default."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from common.processes import ManagedProcess
from server.runner import Connection, flwr_bin, flwr_env, write_flwr_config

CONNECTION = "medfed"


@dataclass(frozen=True)
class Certificates:
    """The coordinating site's files written by ``server.provision`` (``DIR/server``).

    Attributes:
        folder: holds ``ca.crt``, ``server.crt``, ``server.key`` and
            ``hospitals/*.pub`` (the public keys of registered hospitals).
    """

    folder: Path

    @property
    def ca(self) -> Path:
        """The federation's CA certificate."""
        return self.folder / "ca.crt"

    def check(self) -> None:
        """Raise FileNotFoundError naming the first missing file."""
        for name in ("ca.crt", "server.crt", "server.key"):
            if not (self.folder / name).is_file():
                raise FileNotFoundError(
                    f"{self.folder / name} not found: run `python -m server.provision` and pass "
                    "its server/ folder with --certs")

    def hospital_keys(self) -> list[Path]:
        """Public keys of the hospitals to register."""
        return sorted((self.folder / "hospitals").glob("*.pub"))


def superlink_argv(*, host: str, port: int, certs: Certificates | None,
                   database: Path | None = None) -> list[str]:
    """``flower-superlink`` command line; ``certs=None`` means insecure (no TLS, no auth).

    ``database`` keeps the SuperLink's state (registered hospitals) in a file,
    so a restarted server still knows its hospitals.
    """
    argv = [flwr_bin("flower-superlink"), "--host", host, "--port", str(port),
            "--disable-runtime-dependency-installation"]
    if database is not None:
        argv += ["--database", str(database)]
    if certs is None:
        return [*argv, "--insecure"]
    return [*argv, "--ssl-ca-certfile", str(certs.ca),
            "--ssl-certfile", str(certs.folder / "server.crt"),
            "--ssl-keyfile", str(certs.folder / "server.key"), "--enable-supernode-auth"]


def superlink_process(*, host: str, port: int, certs: Certificates | None, log_dir: Path,
                      flwr_home: Path) -> ManagedProcess:
    """The SuperLink as a managed process logging to ``log_dir/superlink.log``."""
    argv = superlink_argv(host=host, port=port, certs=certs, database=log_dir / "superlink.db")
    return ManagedProcess("superlink", argv, log_dir / "superlink.log",
                          env={"FLWR_HOME": str(flwr_home)})


def connection(*, address: str, certs: Certificates | None) -> Connection:
    """How Flower's CLI on this machine reaches the SuperLink."""
    return Connection(name=CONNECTION, address=address,
                      root_certificates=None if certs is None else str(certs.ca))


def register_hospital(public_key: Path, conn: Connection, flwr_home: Path) -> str:
    """Register one hospital's public key with the running SuperLink.

    Returns:
        Flower's answer (the node id, or that the key was already registered).

    Raises:
        RuntimeError: Flower refused the key (its message is quoted).
    """
    write_flwr_config(flwr_home, conn)
    done = subprocess.run([flwr_bin("flwr"), "supernode", "register", str(public_key), conn.name],
                          capture_output=True, text=True, env=flwr_env(flwr_home), timeout=60)
    text = (done.stdout + done.stderr).strip()
    if done.returncode != 0 and "already" not in text.lower():
        raise RuntimeError(f"registering {public_key.name} failed: {text.splitlines()[-1:]}")
    return text.splitlines()[-1] if text else ""
