"""Which hospitals may join: their public keys, registered with the SuperLink.

    python -m server.registry add --certs deploy/server site-d     # after provision add
    python -m server.registry remove --certs deploy/server site-b
    python -m server.registry list --certs deploy/server

Each command talks to the running server's SuperLink over TLS with the
federation's CA, on the loopback port the server recorded in
``state/control.json`` (``--superlink HOST:PORT`` to name another; the
hospitals' public port refuses these calls). When no server is running, it
opens the site's SuperLink database through a private SuperLink on a
loopback port instead, so the change is there at the next start.
``remove`` also moves ``hospitals/NAME.pub`` to ``hospitals/removed/`` so
the server does not register it again.

Flower's CLI does not show which key a node ID belongs to, so the names
and node IDs are recorded in ``state/registered.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from common.fingerprint import key_fingerprint
from common.logs import medfed_logger
from common.processes import running
from server.runner import Connection, flwr_bin, flwr_env, write_flwr_config
from server.superlink import (
    Certificates,
    connection,
    control_address,
    private_superlink,
    wait_until_listening,
)

REGISTERED_FILE = "registered.json"
KEY_IN_USE = "[code: 23]"
"""Flower's answer when a public key is registered already."""
CLI_TIMEOUT_S = 120

log = medfed_logger()


class RegistrationError(RuntimeError):
    """Flower refused a registration change (its message is quoted)."""


def fingerprint(public_key: Path) -> str:
    """SHA-256 of an OpenSSH public key's key material, as ``ssh-keygen -l`` prints it."""
    return key_fingerprint(public_key.read_bytes())


def load_records(certs: Certificates) -> dict[str, dict[str, str]]:
    """Name -> {"node-id", "fingerprint"[, "removed"]} of hospitals registered through MedFed."""
    path = certs.state / REGISTERED_FILE
    if not path.is_file() or not certs.database.is_file():
        return {}  # no database: nothing is registered, whatever the file says
    records: dict[str, dict[str, str]] = json.loads(path.read_text())
    return records


def save_records(certs: Certificates, records: dict[str, dict[str, str]]) -> None:
    """Write ``state/registered.json`` atomically."""
    certs.state.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = certs.state / REGISTERED_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(records, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def flwr_json(args: Sequence[str], conn: Connection, flwr_home: Path) -> dict:
    """Run ``flwr ARGS CONNECTION --format json`` and return its JSON answer.

    Raises:
        RegistrationError: the CLI's answer is not JSON (its output is quoted).
    """
    write_flwr_config(flwr_home, conn)
    done = subprocess.run([flwr_bin("flwr"), *args, conn.name, "--format", "json"],
                          capture_output=True, text=True, env=flwr_env(flwr_home),
                          timeout=CLI_TIMEOUT_S, check=False)
    text = done.stdout.strip()
    try:
        answer: dict = json.loads(text[text.index("{"):])
    except ValueError:
        raise RegistrationError(f"`flwr {' '.join(args[:2])}` answered: "
                                f"{(text + done.stderr).strip()[-500:]}") from None
    return answer


def register(name: str, public_key: Path, conn: Connection, flwr_home: Path) -> str | None:
    """Register one hospital's public key.

    Returns:
        The new node ID, or None when the key was registered already.

    Raises:
        RegistrationError: Flower refused the key.
    """
    answer = flwr_json(["supernode", "register", str(public_key)], conn, flwr_home)
    if answer.get("success"):
        return str(answer["node-id"])
    message = str(answer.get("error-message", answer))
    if KEY_IN_USE in message:
        return None
    raise RegistrationError(f"registering {name} ({public_key}) failed: {message.strip()}")


def unregister(node_id: str, conn: Connection, flwr_home: Path) -> None:
    """Unregister a node: its key is refused from then on.

    Raises:
        RegistrationError: Flower refused (for instance an unknown node ID).
    """
    answer = flwr_json(["supernode", "unregister", node_id], conn, flwr_home)
    if not answer.get("success"):
        raise RegistrationError(f"unregistering node {node_id} failed: "
                                f"{answer.get('error-message', answer)}")


def list_nodes(conn: Connection, flwr_home: Path) -> list[dict]:
    """The SuperLink's nodes as Flower reports them (node-id, status, times)."""
    answer = flwr_json(["supernode", "list"], conn, flwr_home)
    if not answer.get("success"):
        raise RegistrationError(f"listing nodes failed: {answer.get('error-message', answer)}")
    nodes: list[dict] = answer["nodes"]
    return nodes


def register_all(certs: Certificates, conn: Connection, flwr_home: Path,
                 names: Sequence[str] | None = None) -> list[str]:
    """Register the keys in ``hospitals/`` not yet registered; returns what was done.

    A hospital whose key was replaced (``provision rekey``) has its old node
    unregistered first, so the old key stops working.
    """
    records = load_records(certs)
    done = []
    for name, key in certs.hospital_keys().items():
        if names is not None and name not in names:
            continue
        old = records.get(name, {})
        if old.get("fingerprint") == fingerprint(key):
            if old.get("removed"):
                raise RegistrationError(
                    f"{name}'s key was removed and Flower never accepts it again: the "
                    f"hospital makes a new one (`python -m client keygen --kit DIR --force`) "
                    f"and you take it in (`python -m server.provision rekey --out DIR {name} "
                    f"{name}.pub`)")
            continue
        if old.get("node-id", "unknown") != "unknown":  # a replaced key stops working
            with contextlib.suppress(RegistrationError):
                unregister(old["node-id"], conn, flwr_home)
        node_id = register(name, key, conn, flwr_home)
        if node_id is None:
            node_id = old.get("node-id", "unknown")
            done.append(f"{name}: Flower knows this key already (node {node_id}); if it was "
                        "removed, the hospital makes a new one (`python -m client keygen "
                        "--force`) and you take it in with `python -m server.provision rekey`")
        else:
            done.append(f"{name}: registered as node {node_id}")
        records[name] = {"node-id": node_id, "fingerprint": fingerprint(key)}
        save_records(certs, records)
    return done


def unregistered(certs: Certificates) -> list[str]:
    """Names of hospitals in ``hospitals/`` whose current key is not on record."""
    records = load_records(certs)
    return [name for name, key in certs.hospital_keys().items()
            if records.get(name, {}).get("fingerprint") != fingerprint(key)]


@contextlib.contextmanager
def site_superlink(certs: Certificates, address: str | None, log_dir: Path
                   ) -> Iterator[tuple[Connection, Path]]:
    """A connection to the site's SuperLink: the running one, or a private one meanwhile.

    Args:
        certs: the site's folder.
        address: the running SuperLink's Control API; None = the one the
            running server recorded (see :func:`control_address`).
        log_dir: where a private SuperLink logs.
    """
    flwr_home = certs.state / "flwr-home"
    live = control_address(certs, address)
    if live is not None:
        yield connection(address=live, certs=certs), flwr_home
        return
    link, conn = private_superlink(certs, log_dir / "superlink-registry.log", flwr_home)
    with running(link):
        wait_until_listening(link, conn.address)
        yield conn, flwr_home


def preregister(certs: Certificates, log_dir: Path) -> list[str]:
    """Register every new hospital key before the public SuperLink starts."""
    if not unregistered(certs):
        return []
    flwr_home = certs.state / "flwr-home"
    link, conn = private_superlink(certs, log_dir / "superlink-registry.log", flwr_home)
    with running(link):
        wait_until_listening(link, conn.address)
        return register_all(certs, conn, flwr_home)


def wait_for_hospitals(conn: Connection, flwr_home: Path, *, count: int, timeout_s: float,
                       names: dict[str, str] | None = None) -> list[str]:
    """Wait until ``count`` hospitals are online, or ``timeout_s`` has passed.

    Args:
        conn: the running SuperLink.
        flwr_home: Flower CLI home.
        count: hospitals to wait for.
        timeout_s: the longest wait.
        names: node ID -> hospital name, for the progress lines.

    Returns:
        The online hospitals' names (node IDs where the name is unknown).
    """
    names = names or {}
    deadline = time.monotonic() + timeout_s
    online: list[str] = []
    while True:
        now = sorted(names.get(n["node-id"], f"node {n['node-id']}")
                     for n in list_nodes(conn, flwr_home) if n["status"] == "online")
        if now != online:
            log.info("[MedFed] hospitals connected: %d/%d (%s)", len(now), count,
                     ", ".join(now) or "none yet")
            online = now
        if len(online) >= count or time.monotonic() >= deadline:
            return online
        time.sleep(2)


def remove(certs: Certificates, name: str, conn: Connection, flwr_home: Path) -> str:
    """Unregister a hospital and retire its public key file."""
    records = load_records(certs)
    key = certs.folder / "hospitals" / f"{name}.pub"
    if name not in records and not key.exists():
        raise RegistrationError(f"no hospital named {name!r} in {certs.folder / 'hospitals'}")
    node_id = records.get(name, {}).get("node-id")
    if node_id and node_id != "unknown":
        unregister(node_id, conn, flwr_home)
    if key.exists():
        retired = key.parent / "removed" / key.name
        retired.parent.mkdir(exist_ok=True)
        key.replace(retired)
    if name in records:
        records[name]["removed"] = time.strftime("%Y-%m-%d %H:%M:%S")
    save_records(certs, records)
    if not node_id or node_id == "unknown":
        return (f"{name}: key retired, but its node ID is not on record: find it with "
                "`flwr supernode list` and run `flwr supernode unregister NODE_ID`")
    return f"{name}: node {node_id} unregistered; its key moved to hospitals/removed/"


def main(argv: Sequence[str]) -> int:
    """Command line; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m server.registry", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("add", "remove", "list"))
    parser.add_argument("names", nargs="*", help="hospital names (add: default all new ones)")
    parser.add_argument("--certs", type=Path, required=True, help="server/ folder from provision")
    parser.add_argument("--superlink", default=None,
                        help="the running SuperLink's Control API HOST:PORT (default: the "
                             "loopback address the running server recorded in state/)")
    args = parser.parse_intermixed_args(argv)
    certs = Certificates(args.certs.resolve())
    try:
        certs.check()
        with site_superlink(certs, args.superlink, certs.state) as (conn, flwr_home):
            if args.action == "add":
                lines = register_all(certs, conn, flwr_home, args.names or None)
                print("\n".join(lines) or "every hospital key is registered already")
            elif args.action == "remove":
                for name in args.names:
                    print(remove(certs, name, conn, flwr_home))
            else:
                if control_address(certs, args.superlink) is None:
                    print("no server is running: statuses are as last recorded in the "
                          "site's database")
                names = {r["node-id"]: n + (" (removed)" if r.get("removed") else "")
                         for n, r in load_records(certs).items()}
                for node in list_nodes(conn, flwr_home):
                    print(f"{names.get(node['node-id'], '?'):<24} node {node['node-id']:<22} "
                          f"{node['status']}")
    except (RegistrationError, ValueError, OSError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
