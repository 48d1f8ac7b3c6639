"""Provision a federation: a CA, the server's TLS certificate, a key pair per hospital.

    python -m server.provision --out deploy --server-address 10.0.0.5:9092 \\
        --hosts coordinator.example.org,10.0.0.5 --hospitals site-a site-b site-c

Writes (private keys owner-only, mode 0600, in owner-only folders):

    deploy/ca.key                      the certificate authority's key (keep offline)
    deploy/server/{ca.crt,server.crt,server.key}   the coordinating site's TLS files
    deploy/server/hospitals/NAME.pub   public keys to register with the SuperLink
    deploy/hospitals/NAME/             one folder to hand to each hospital:
        NAME.key  ca.crt  server-address.txt  README.md

Hospital keys are EC P-384 in OpenSSH format, as Flower's SuperNode
authentication expects.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

VALID_DAYS = 365


def _write(path: Path, data: bytes, *, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if private:
        path.parent.chmod(0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        path.chmod(0o600)
    else:
        path.write_bytes(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "MedFed federation"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_ca(days: int = VALID_DAYS) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed certificate authority for this federation."""
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.UTC)
    ca_name = _name("MedFed CA")
    cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, hashes.SHA384()))
    return key, cert


def make_server_cert(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
                     hosts: list[str], days: int = VALID_DAYS
                     ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The SuperLink's TLS certificate, valid for every name/IP in ``hosts``."""
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA384()))
    return key, cert


def make_hospital_keys(name: str, folder: Path) -> Path:
    """An EC P-384 key pair in OpenSSH format; returns the public key's path."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    _write(folder / f"{name}.key", private, private=True)
    _write(folder / f"{name}.pub", public + f" medfed-{name}\n".encode())
    return folder / f"{name}.pub"


HOSPITAL_README = """# MedFed hospital kit: {name}

Keep `{name}.key` secret (it proves this hospital to the coordinating site).
The coordinating site registered the matching public key; `ca.crt` lets this
hospital verify the server. From a MedFed checkout (see its README):

1. Start this hospital's node (it keeps retrying until the server is up):

       .venv/bin/python -m client --superlink {address} --name {name} \\
           --partition-id {index} --num-partitions {count} \\
           --key {kit}/{name}.key --ca {kit}/ca.crt \\
           --data-path /path/to/{name}/images --ledger-path /secure/{name}-privacy-ledger.json

2. Leave it running; stop it with Ctrl-C. Outbound TCP to {address} is all it needs.
"""


def provision(out: Path, *, hosts: list[str], hospitals: list[str], server_address: str,
              days: int = VALID_DAYS) -> None:
    """Write every file of a new federation into ``out`` (see module docstring)."""
    ca_key, ca_cert = make_ca(days)
    server_key, server_cert = make_server_cert(ca_key, ca_cert, hosts, days)
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    _write(out / "ca.key", _pem_key(ca_key), private=True)
    _write(out / "server" / "server.key", _pem_key(server_key), private=True)
    _write(out / "server" / "server.crt", server_cert.public_bytes(serialization.Encoding.PEM))
    _write(out / "server" / "ca.crt", ca_pem)
    for index, name in enumerate(hospitals):
        kit = out / "hospitals" / name
        public = make_hospital_keys(name, kit)
        _write(out / "server" / "hospitals" / public.name, public.read_bytes())
        public.unlink()
        _write(kit / "ca.crt", ca_pem)
        _write(kit / "server-address.txt", f"{server_address}\n".encode())
        readme = HOSPITAL_README.format(name=name, address=server_address, index=index,
                                        count=len(hospitals), kit=kit)
        _write(kit / "README.md", readme.encode())


def main(argv: list[str]) -> int:
    """Command line."""
    parser = argparse.ArgumentParser(prog="python -m server.provision", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder to create")
    parser.add_argument("--hosts", default="localhost,127.0.0.1",
                        help="comma-separated DNS names / IPs of the coordinating site")
    parser.add_argument("--server-address", default="127.0.0.1:9092",
                        help="HOST:PORT the hospitals dial")
    parser.add_argument("--hospitals", nargs="+", required=True, help="hospital names")
    parser.add_argument("--days", type=int, default=VALID_DAYS, help="certificate validity")
    args = parser.parse_args(argv)
    if (args.out / "ca.key").exists():
        print(f"error: {args.out} already holds a federation; choose another --out",
              file=sys.stderr)
        return 2
    provision(args.out, hosts=[h.strip() for h in args.hosts.split(",") if h.strip()],
              hospitals=args.hospitals, server_address=args.server_address, days=args.days)
    print(f"federation written to {args.out}: hand {args.out}/hospitals/NAME/ to each hospital")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
