"""Provision a federation: a CA, the server's TLS certificate, a key pair per hospital.

    python -m server.provision init --out deploy --server-address coordinator.example.org:9092 \\
        --hospitals site-a site-b site-c
    python -m server.provision add --out deploy --hospitals site-d
    python -m server.provision rekey --out deploy --hospitals site-b   # replace a key
    python -m server.provision renew --out deploy            # new server certificate
    python -m server.provision renew --out deploy --ca       # new CA too (send new ca.crt)
    python -m server.provision show --out deploy

``init`` writes (private keys mode 0600, their folders 0700):

    deploy/federation.toml             server address, certificate names, hospitals in order
    deploy/ca.key                      the certificate authority's key (keep it offline)
    deploy/server/                     the coordinating site's folder (``--certs`` of the server)
        ca.crt  server.crt  server.key  hospitals/NAME.pub
    deploy/hospitals/NAME/             the startup folder to hand to each hospital
        NAME.key  ca.crt  hospital.toml  README.md

The server certificate names the ``--hosts`` (default: the host of
``--server-address``) plus ``localhost`` and ``127.0.0.1``, which the
coordinating site's own Flower CLI uses. Hospital keys are EC P-384 in
OpenSSH format, as Flower's SuperNode authentication expects.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from server.pki import (
    CA_DAYS,
    SERVER_DAYS,
    certificate_expiry,
    make_ca,
    make_node_keys,
    make_server_cert,
    pem_key,
    write_file,
)

FEDERATION_FILE = "federation.toml"
KIT_FILE = "hospital.toml"
LOCAL_NAMES = ("localhost", "127.0.0.1")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")


class ProvisionError(ValueError):
    """A provisioning request that cannot be carried out (the message says why)."""


def _toml(values: dict[str, object]) -> str:
    lines = []
    for key, value in values.items():
        if isinstance(value, list):
            lines.append(f"{key} = [{', '.join(json.dumps(v) for v in value)}]")
        else:
            lines.append(f"{key} = {json.dumps(value)}")  # JSON strings/ints are valid TOML
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Federation:
    """What ``federation.toml`` records.

    Attributes:
        server_address: HOST:PORT the hospitals dial.
        hosts: names and IPs in the server certificate.
        hospitals: hospital names in partition order.
    """

    server_address: str
    hosts: list[str]
    hospitals: list[str]

    def write(self, out: Path) -> None:
        """Write ``out/federation.toml``."""
        write_file(out / FEDERATION_FILE, _toml({"server-address": self.server_address,
                                                 "hosts": self.hosts,
                                                 "hospitals": self.hospitals}).encode())


def read_federation(out: Path) -> Federation:
    """The ``federation.toml`` of a provisioned folder.

    Raises:
        ProvisionError: ``out`` was not written by ``init``.
    """
    path = out / FEDERATION_FILE
    if not path.is_file():
        raise ProvisionError(f"{path} not found: create the federation with "
                             "`python -m server.provision init` first")
    raw = tomllib.loads(path.read_text())
    return Federation(str(raw["server-address"]), [str(h) for h in raw["hosts"]],
                      [str(h) for h in raw["hospitals"]])


HOSPITAL_README = """# MedFed startup folder for hospital `{name}`

Keep `{name}.key` secret: it is how the coordinating site recognizes this
hospital. `ca.crt` lets this hospital check it talks to the real server;
`hospital.toml` holds the server's address ({address}) and this hospital's
name and number. Outbound TCP to {address} is all the node needs.

1. Install MedFed once (Python 3.11+), in a checkout of its repository:

       python3 -m venv .venv && .venv/bin/pip install "torch==2.13.*" -e .

2. Start this hospital's node and leave it running (Ctrl-C stops it). It
   waits for the server if the server is not up yet, and reconnects when the
   server restarts:

       .venv/bin/python -m client --kit /path/to/this/folder \\
           --data-path /path/to/{name}/images --ledger-path /secure/{name}-privacy.json

   Add `--device cuda` to train on a GPU and `--max-epsilon 8` to cap the
   differential-privacy budget ever spent on this hospital's images.
"""


def _write_kit(out: Path, name: str, index: int, count: int, address: str) -> None:
    kit = out / "hospitals" / name
    private, public = make_node_keys(name)
    write_file(kit / f"{name}.key", private, private=True)
    write_file(out / "server" / "hospitals" / f"{name}.pub", public)
    write_file(kit / "ca.crt", (out / "server" / "ca.crt").read_bytes())
    write_file(kit / KIT_FILE, _toml({"hospital-name": name, "superlink": address,
                                      "partition-id": index, "num-partitions": count,
                                      "key": f"{name}.key", "ca": "ca.crt"}).encode())
    write_file(kit / "README.md", HOSPITAL_README.format(name=name, address=address).encode())


def _check_names(names: Sequence[str], taken: Sequence[str]) -> None:
    for name in names:
        if not NAME_PATTERN.fullmatch(name):
            raise ProvisionError(f"hospital name {name!r}: use letters, digits, '-' and '_'")
        if name in taken or list(names).count(name) > 1:
            raise ProvisionError(f"hospital {name!r} is already part of the federation")


def _check_address(address: str) -> str:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ProvisionError(f"--server-address {address!r} must be HOST:PORT")
    return host.strip("[]")


def _issue_server(out: Path, hosts: Sequence[str], days: int) -> None:
    ca_key = serialization.load_pem_private_key((out / "ca.key").read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate((out / "server" / "ca.crt").read_bytes())
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key, cert = make_server_cert(ca_key, ca_cert, hosts, days)
    write_file(out / "server" / "server.key", pem_key(key), private=True)
    write_file(out / "server" / "server.crt", cert.public_bytes(serialization.Encoding.PEM))


def _write_ca(out: Path, days: int) -> None:
    ca_key, ca_cert = make_ca(days)
    write_file(out / "ca.key", pem_key(ca_key), private=True)
    write_file(out / "server" / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM))


def init(out: Path, *, server_address: str, hospitals: Sequence[str],
         hosts: Sequence[str] = (), ca_days: int = CA_DAYS, server_days: int = SERVER_DAYS
         ) -> None:
    """Create a new federation in ``out`` (see the module docstring for the files)."""
    if (out / "ca.key").exists():
        raise ProvisionError(f"{out} already holds a federation: use `add` or `renew`")
    names = list(dict.fromkeys([*(hosts or [_check_address(server_address)]), *LOCAL_NAMES]))
    _check_names(hospitals, [])
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    out.chmod(0o700)
    _write_ca(out, ca_days)
    _issue_server(out, names, server_days)
    for index, name in enumerate(hospitals):
        _write_kit(out, name, index, len(hospitals), server_address)
    Federation(server_address, names, list(hospitals)).write(out)


def add(out: Path, hospitals: Sequence[str]) -> None:
    """Add hospitals to a provisioned federation (numbered after the existing ones)."""
    fed = read_federation(out)
    _check_names(hospitals, fed.hospitals)
    everyone = [*fed.hospitals, *hospitals]
    for name in hospitals:
        _write_kit(out, name, everyone.index(name), len(everyone), fed.server_address)
    Federation(fed.server_address, fed.hosts, everyone).write(out)


def rekey(out: Path, name: str) -> None:
    """A new key pair (and startup folder) for a hospital, e.g. after its key was removed."""
    fed = read_federation(out)
    if name not in fed.hospitals:
        raise ProvisionError(f"no hospital {name!r} in {out / FEDERATION_FILE}; use `add`")
    _write_kit(out, name, fed.hospitals.index(name), len(fed.hospitals), fed.server_address)


def renew(out: Path, *, hosts: Sequence[str] = (), new_ca: bool = False,
          ca_days: int = CA_DAYS, server_days: int = SERVER_DAYS) -> None:
    """Issue a new server certificate (and with ``new_ca`` a new CA, copied into every kit)."""
    fed = read_federation(out)
    names = list(dict.fromkeys([*hosts, *LOCAL_NAMES])) if hosts else fed.hosts
    if new_ca:
        _write_ca(out, ca_days)
        for kit in sorted((out / "hospitals").iterdir()):
            write_file(kit / "ca.crt", (out / "server" / "ca.crt").read_bytes())
    _issue_server(out, names, server_days)
    Federation(fed.server_address, names, fed.hospitals).write(out)


def show(out: Path) -> str:
    """A short description: address, certificate names and expiry, hospitals."""
    fed = read_federation(out)
    ca = certificate_expiry(out / "server" / "ca.crt")
    server = certificate_expiry(out / "server" / "server.crt")
    return (f"server address: {fed.server_address}\n"
            f"server certificate names: {', '.join(fed.hosts)}\n"
            f"server certificate expires: {server:%Y-%m-%d}\n"
            f"CA certificate expires: {ca:%Y-%m-%d}\n"
            f"hospitals (partition order): {', '.join(fed.hospitals)}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m server.provision", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="action", required=True)
    for action, text in (("init", "create a new federation"), ("add", "add hospitals"),
                         ("rekey", "new keys for hospitals (a removed key is never "
                                   "accepted again)"),
                         ("renew", "issue a new server certificate"), ("show", "describe")):
        cmd = sub.add_parser(action, help=text)
        cmd.add_argument("--out", type=Path, required=True, help="the federation's folder")
        if action in ("init", "add", "rekey"):
            cmd.add_argument("--hospitals", nargs="+", required=True, help="hospital names")
        if action == "init":
            cmd.add_argument("--server-address", required=True,
                             help="HOST:PORT the hospitals dial (the server's --port)")
        if action in ("init", "renew"):
            cmd.add_argument("--hosts", default="",
                             help="comma-separated DNS names/IPs for the server certificate "
                                  "(default: the server address' host)")
            cmd.add_argument("--days", type=int, default=SERVER_DAYS,
                             help="server certificate validity in days")
            cmd.add_argument("--ca-days", type=int, default=CA_DAYS, help="CA validity in days")
        if action == "renew":
            cmd.add_argument("--ca", action="store_true",
                             help="also a new CA: every hospital then needs the new ca.crt")
    return parser


def main(argv: Sequence[str]) -> int:
    """Command line; returns the exit code."""
    args = _parser().parse_args(argv)
    hosts = [h.strip() for h in getattr(args, "hosts", "").split(",") if h.strip()]
    try:
        if args.action == "init":
            init(args.out, server_address=args.server_address, hospitals=args.hospitals,
                 hosts=hosts, ca_days=args.ca_days, server_days=args.days)
            print(f"federation written to {args.out}: start the server with "
                  f"--certs {args.out / 'server'}; hand {args.out}/hospitals/NAME/ to each "
                  "hospital (by a channel you trust: it holds the hospital's private key)")
        elif args.action == "add":
            add(args.out, args.hospitals)
            print(f"added {', '.join(args.hospitals)}: register with `python -m server.registry "
                  f"add --certs {args.out / 'server'} NAME` while the server runs")
        elif args.action == "rekey":
            for name in args.hospitals:
                rekey(args.out, name)
            print(f"new keys for {', '.join(args.hospitals)}: hand over the new startup "
                  f"folders, then `python -m server.registry add --certs {args.out / 'server'} "
                  "NAME`")
        elif args.action == "renew":
            renew(args.out, hosts=hosts, new_ca=args.ca, ca_days=args.ca_days,
                  server_days=args.days)
            print("new certificate written; restart the server"
                  + (" and give every hospital its new ca.crt" if args.ca else ""))
        print(show(args.out))
    except (ProvisionError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
