"""Provision a federation: a CA, the server's TLS certificate, the hospitals' public keys.

    python -m server.provision init --out deploy --server-address coordinator.example.org:9092 \\
        --hospitals site-a site-b site-c [--ca-dir /media/ca-stick/deploy-ca]
    python -m server.provision add-key --out deploy site-a site-a.pub   # the key site-a made
    python -m server.provision add --out deploy --hospitals site-d
    python -m server.provision rekey --out deploy site-b site-b.pub     # site-b's new key
    python -m server.provision renew --out deploy            # new server certificate
    python -m server.provision renew --out deploy --ca       # new CA too (send new ca.crt)
    python -m server.provision show --out deploy

Every hospital makes its own key pair (``python -m client keygen --kit DIR``)
and hands over only the public key; provisioning never writes a hospital's
private key. ``init`` writes (private keys mode 0600, their folders 0700):

    deploy-ca/                         the CA folder (``--ca-dir``): keep it offline
        ca.key  ca.crt                 ca.key encrypted with a passphrase (see server/ca_key.py)
    deploy/federation.toml             server address, certificate names, hospitals in order
    deploy/server/                     the coordinating site's folder (``--certs`` of the server)
        ca.crt  server.crt  server.key  hospitals/NAME.pub (from add-key)
    deploy/hospitals/NAME/             the startup folder to hand to each hospital (no secret)
        ca.crt  hospital.toml  README.md

``add-key`` checks a hospital's ``NAME.pub`` (EC P-384, OpenSSH) and prints
its fingerprint, to compare over the phone with what the hospital's keygen
printed. The server certificate names the ``--hosts`` (default: the host of
``--server-address``) plus ``localhost`` and ``127.0.0.1`` (the site's own CLI).
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from common.fingerprint import certificate_fingerprint
from server.ca_key import OfflineCA, add_ca_options, cli_passphrase, default_ca_dir
from server.hospital_keys import key_status, take_in
from server.hospital_kit import toml_text, write_kit
from server.pki import CA_DAYS, SERVER_DAYS, certificate_expiry, write_file

FEDERATION_FILE = "federation.toml"
LOCAL_NAMES = ("localhost", "127.0.0.1")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")


class ProvisionError(ValueError):
    """A provisioning request that cannot be carried out (the message says why)."""


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
        write_file(out / FEDERATION_FILE, toml_text({"server-address": self.server_address,
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


def _write_kit(out: Path, name: str, index: int, count: int, address: str) -> None:
    write_kit(out / "hospitals" / name, name=name, index=index, count=count, address=address,
              ca_pem=(out / "server" / "ca.crt").read_bytes())


def add_key(out: Path, name: str, public_key: Path, *, replace: bool = False) -> str:
    """Take in the public key hospital ``name`` made (``python -m client keygen``).

    Writes ``server/hospitals/NAME.pub`` (see :func:`server.hospital_keys.take_in`).

    Returns:
        The key's fingerprint, to read back to the hospital.

    Raises:
        ProvisionError: ``name`` is not part of the federation.
        KeyFileError: the key file cannot be taken in (the message names it).
    """
    if name not in read_federation(out).hospitals:
        raise ProvisionError(f"no hospital {name!r} in {out / FEDERATION_FILE}: add it first "
                             f"with `python -m server.provision add --hospitals {name}`")
    return take_in(out / "server" / "hospitals", name, public_key, replace=replace)


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


def _offline_ca(out: Path, ca_dir: Path | None) -> OfflineCA:
    ca = OfflineCA(ca_dir or default_ca_dir(out))
    ca.check_outside(out)
    if (out / "ca.key").exists():
        raise ProvisionError(f"{out / 'ca.key'} lies inside the federation folder (as provision "
                             f"wrote it before): move it to {ca.key}, keep that folder "
                             "offline, and run again")
    return ca


def check_init(out: Path, ca_dir: Path | None, server_address: str,
               hospitals: Sequence[str]) -> OfflineCA:
    """Refuse (ProvisionError, CAKeyError) an ``init`` that would overwrite or has bad names."""
    if (out / FEDERATION_FILE).exists():
        raise ProvisionError(f"{out} already holds a federation: use `add` or `renew`")
    ca = _offline_ca(out, ca_dir)
    if ca.key.exists():
        raise ProvisionError(f"{ca.key} exists (another federation's CA?): choose another "
                             "--ca-dir")
    _check_address(server_address)
    _check_names(hospitals, [])
    return ca


def init(out: Path, *, server_address: str, hospitals: Sequence[str],
         hosts: Sequence[str] = (), ca_dir: Path | None = None,
         ca_passphrase: bytes | None = None, ca_days: int = CA_DAYS,
         server_days: int = SERVER_DAYS) -> None:
    """Create a new federation in ``out`` and its CA in ``ca_dir`` (default ``OUT-ca``).

    ``ca_passphrase`` encrypts the CA key; None writes it unencrypted (the
    command line allows that only with ``--no-ca-passphrase``). No hospital
    key is written: each hospital makes its own and sends the public half
    (:func:`add_key`).
    """
    ca = check_init(out, ca_dir, server_address, hospitals)
    names = list(dict.fromkeys([*(hosts or [_check_address(server_address)]), *LOCAL_NAMES]))
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    out.chmod(0o700)
    ca.create(out / "server", ca_passphrase, ca_days)
    ca.issue_server(out / "server", ca_passphrase, names, server_days)
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


def renew(out: Path, *, ca_dir: Path | None = None, ca_passphrase: bytes | None = None,
          hosts: Sequence[str] = (), new_ca: bool = False, ca_days: int = CA_DAYS,
          server_days: int = SERVER_DAYS) -> None:
    """Issue a new server certificate (and with ``new_ca`` a new CA, copied into every kit).

    ``ca_passphrase`` opens the CA key in ``ca_dir`` (and encrypts a new one).
    """
    fed = read_federation(out)
    ca = _offline_ca(out, ca_dir)
    names = list(dict.fromkeys([*hosts, *LOCAL_NAMES])) if hosts else fed.hosts
    if new_ca:
        ca.create(out / "server", ca_passphrase, ca_days)
        for kit in sorted((out / "hospitals").iterdir()):
            write_file(kit / "ca.crt", (out / "server" / "ca.crt").read_bytes())
    ca.issue_server(out / "server", ca_passphrase, names, server_days)
    Federation(fed.server_address, names, fed.hospitals).write(out)


def show(out: Path) -> str:
    """A short description: address, certificates (expiry, CA fingerprint), hospitals' keys."""
    fed = read_federation(out)
    ca = out / "server" / "ca.crt"
    server = certificate_expiry(out / "server" / "server.crt")
    keys = "\n".join(f"  {name}: {key_status(out / 'server' / 'hospitals', name)}"
                     for name in fed.hospitals)
    return (f"server address: {fed.server_address}\n"
            f"server certificate names: {', '.join(fed.hosts)}\n"
            f"server certificate expires: {server:%Y-%m-%d}\n"
            f"CA certificate expires: {certificate_expiry(ca):%Y-%m-%d}\n"
            f"CA certificate fingerprint: {certificate_fingerprint(ca.read_bytes())}\n"
            f"hospitals (partition order): {', '.join(fed.hospitals)}\n"
            f"hospital keys:\n{keys}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m server.provision", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="action", required=True)
    for action, text in (("init", "create a new federation"), ("add", "add hospitals"),
                         ("add-key", "take in the public key a hospital made"),
                         ("rekey", "take in a hospital's new public key (replaces its old)"),
                         ("renew", "issue a new server certificate"), ("show", "describe")):
        cmd = sub.add_parser(action, help=text)
        cmd.add_argument("--out", type=Path, required=True, help="the federation's folder")
        if action in ("init", "add"):
            cmd.add_argument("--hospitals", nargs="+", required=True, help="hospital names")
        if action in ("add-key", "rekey"):
            cmd.add_argument("name", help="the hospital")
            cmd.add_argument("public_key", type=Path, help="the NAME.pub it sent")
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
            add_ca_options(cmd)
        if action == "renew":
            cmd.add_argument("--ca", action="store_true",
                             help="also a new CA: every hospital then needs the new ca.crt")
    return parser


def _passphrase(args: argparse.Namespace, *, new: bool) -> bytes | None:
    return cli_passphrase(OfflineCA(args.ca_dir or default_ca_dir(args.out)),
                          args.ca_passphrase_file, new=new, allow_plain=args.no_ca_passphrase)


def _init(args: argparse.Namespace, hosts: list[str]) -> None:
    check_init(args.out, args.ca_dir, args.server_address, args.hospitals)
    init(args.out, server_address=args.server_address, hospitals=args.hospitals, hosts=hosts,
         ca_dir=args.ca_dir, ca_passphrase=_passphrase(args, new=True),
         ca_days=args.ca_days, server_days=args.days)
    out = args.out
    print(f"federation written to {out}; CA key in {args.ca_dir or default_ca_dir(out)}: keep "
          f"that folder offline (only `renew` needs it). Next: hand {out}/hospitals/NAME/ to "
          "each hospital (no secret in it; read them the CA fingerprint below); each runs "
          "`python -m client keygen --kit DIR` and sends NAME.pub; take each in with `python -m "
          f"server.provision add-key --out {out} NAME NAME.pub` and read back the fingerprint "
          f"it prints; start the server with --certs {out / 'server'}")


def _add_key(args: argparse.Namespace) -> None:
    replace = args.action == "rekey"
    fingerprint = add_key(args.out, args.name, args.public_key, replace=replace)
    print(f"{args.name}: key taken in from {args.public_key}\n  fingerprint {fingerprint}\n"
          "Read it back to the hospital: it must be the one its keygen printed. The server "
          "registers it when it starts; while it runs: `python -m server.registry add "
          f"--certs {args.out / 'server'} {args.name}`"
          + ("; the old key is refused from then on" if replace else ""))


def main(argv: Sequence[str]) -> int:
    """Command line; returns the exit code (2: refused, with a message)."""
    args = _parser().parse_args(argv)
    hosts = [h.strip() for h in getattr(args, "hosts", "").split(",") if h.strip()]
    try:
        if args.action == "init":
            _init(args, hosts)
        elif args.action == "add":
            add(args.out, args.hospitals)
            print(f"added {', '.join(args.hospitals)}: hand over their startup folders; take "
                  "in the NAME.pub each sends back with `add-key`")
        elif args.action in ("add-key", "rekey"):
            _add_key(args)
        elif args.action == "renew":
            read_federation(args.out)
            renew(args.out, ca_dir=args.ca_dir, ca_passphrase=_passphrase(args, new=args.ca),
                  hosts=hosts, new_ca=args.ca, ca_days=args.ca_days, server_days=args.days)
            print("new certificate written; restart the server"
                  + (" and give every hospital its new ca.crt" if args.ca else ""))
        print(show(args.out))
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
