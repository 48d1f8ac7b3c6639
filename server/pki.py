"""The federation's public-key infrastructure: a CA, the server's certificate, node keys.

Everything is EC P-384 (SHA-384 signatures). Certificates are PEM; hospital
keys are OpenSSH, the format Flower's SuperNode authentication reads. The
coordinating site only ever sees a hospital's public key (the hospital makes
its pair, ``python -m client keygen``). Private files are created owner-only
(0600) in owner-only (0700) folders.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 5 * 365
"""Default validity of the CA certificate."""
SERVER_DAYS = 365
"""Default validity of the server certificate."""


def write_file(path: Path, data: bytes, *, private: bool = False) -> None:
    """Write ``data``; a private file is created 0600 in a 0700 folder, never wider."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if private:
        path.parent.chmod(0o700)
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
    else:
        path.write_bytes(data)


def pem_key(key: ec.EllipticCurvePrivateKey, passphrase: bytes | None = None) -> bytes:
    """A private key as PKCS#8 PEM, encrypted with ``passphrase`` when one is given.

    Unencrypted keys (the SuperLink's, which Flower reads without a passphrase)
    are kept in owner-only files.
    """
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase
        else serialization.NoEncryption())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             encryption)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "MedFed federation"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _builder(subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey,
             days: int) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False))


def make_ca(days: int = CA_DAYS) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed certificate authority for one federation."""
    key = ec.generate_private_key(ec.SECP384R1())
    usage = x509.KeyUsage(digital_signature=False, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          key_cert_sign=True, crl_sign=True, encipher_only=False,
                          decipher_only=False)
    cert = (_builder(_name("MedFed CA"), _name("MedFed CA"), key, days)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(usage, critical=True)
            .sign(key, hashes.SHA384()))
    return key, cert


def make_server_cert(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
                     hosts: Sequence[str], days: int = SERVER_DAYS
                     ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The SuperLink's TLS certificate, valid for every DNS name or IP in ``hosts``."""
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (_builder(_name(hosts[0]), ca_cert.subject, key, days)
            .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA384()))
    return key, cert


def node_public_key(path: Path) -> bytes:
    """A hospital's public key file, checked: an EC P-384 key in OpenSSH format.

    Returns:
        The key as one OpenSSH line without its comment (``ecdsa-sha2-nistp384 BASE64``).

    Raises:
        ValueError: naming the file: unreadable, a private key, not OpenSSH, or
            another key type or curve.
    """
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ValueError(f"{path}: {err.strerror or err}") from None
    if b"PRIVATE KEY" in data:
        raise ValueError(f"{path} is a PRIVATE key: it must never leave the hospital. Ask "
                         "for the NAME.pub that `python -m client keygen` wrote")
    try:
        key = serialization.load_ssh_public_key(data.strip())
    except (ValueError, UnsupportedAlgorithm):
        raise ValueError(f"{path} is not an OpenSSH public key (one line "
                         "`ecdsa-sha2-nistp384 AAAA... NAME`, from `python -m client keygen`)"
                         ) from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve,
                                                                         ec.SECP384R1):
        kind = (f"EC {key.curve.name}" if isinstance(key, ec.EllipticCurvePublicKey)
                else type(key).__name__.removeprefix("_").replace("PublicKey", ""))
        raise ValueError(f"{path} is a {kind} key; the federation needs EC P-384 "
                         "(secp384r1), as `python -m client keygen` makes")
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)


def certificate_expiry(path: Path) -> dt.datetime:
    """When the PEM certificate at ``path`` stops being valid (UTC)."""
    return x509.load_pem_x509_certificate(path.read_bytes()).not_valid_after_utc
