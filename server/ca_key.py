"""The federation's CA key: in its own folder, meant to be kept offline, under a passphrase.

    deploy-ca/ca.key   the CA's private key (mode 0600, folder 0700), encrypted PKCS#8 PEM
    deploy-ca/ca.crt   its certificate (the same as deploy/server/ca.crt)

The CA key is needed only to issue the server's certificate (``provision
init`` and ``renew``); the server itself never reads it, and the federation
folder (``deploy/``, whose ``server/`` the server runs from) never holds it.
By default the CA folder is ``OUT-ca`` beside the federation folder ``OUT``;
move it to removable media between uses and point ``--ca-dir`` at it.

The passphrase comes from ``--ca-passphrase-file FILE`` (first line), else the
environment variable ``MEDFED_CA_PASSPHRASE``, else a prompt when a terminal
is attached (twice for a new key). A new CA key without a passphrase is
refused unless ``--no-ca-passphrase`` is given; then it is written
unencrypted, with a warning. The encryption is what the ``cryptography``
library writes as "best available" for PKCS#8: PBES2 with AES-256-CBC and
PBKDF2-HMAC-SHA256 at 2048 iterations, which ``openssl pkey`` reads. That
stretches a guess little, so the passphrase must be long (at least
:data:`MIN_PASSPHRASE` characters; a random one or five words or more).
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from server.pki import make_ca, make_server_cert, pem_key, write_file

PASSPHRASE_ENV = "MEDFED_CA_PASSPHRASE"
MIN_PASSPHRASE = 12
"""Fewest characters of a new CA key's passphrase."""
ENCRYPTED_PEM = b"-----BEGIN ENCRYPTED PRIVATE KEY-----"


class CAKeyError(ValueError):
    """The CA key or its passphrase cannot be used (the message names the file and the fix)."""


def default_ca_dir(out: Path) -> Path:
    """``OUT-ca`` beside the federation folder ``OUT`` (never inside it)."""
    resolved = out.resolve()
    return resolved.parent / f"{resolved.name}-ca"


@dataclass(frozen=True)
class OfflineCA:
    """The folder holding the CA key.

    Attributes:
        folder: the CA folder (``--ca-dir``).
    """

    folder: Path

    @property
    def key(self) -> Path:
        """The CA's private key."""
        return self.folder / "ca.key"

    @property
    def cert(self) -> Path:
        """The CA's certificate (a copy of the federation's ``server/ca.crt``)."""
        return self.folder / "ca.crt"

    def check_outside(self, out: Path) -> None:
        """Refuse a CA folder inside (or equal to) the federation folder ``out``.

        Raises:
            CAKeyError: it is inside.
        """
        if self.folder.resolve().is_relative_to(out.resolve()):
            raise CAKeyError(f"--ca-dir {self.folder} lies inside the federation folder {out}: "
                             "keep the CA key apart from it (default: "
                             f"{default_ca_dir(out)})")

    def encrypted(self) -> bool:
        """Whether the CA key on disk is passphrase-protected."""
        return self.key.read_bytes().lstrip().startswith(ENCRYPTED_PEM)

    def write(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate,
              passphrase: bytes | None) -> None:
        """Write the key (encrypted with ``passphrase`` when given) and its certificate."""
        write_file(self.key, pem_key(key, passphrase), private=True)
        write_file(self.cert, cert.public_bytes(serialization.Encoding.PEM))

    def create(self, server: Path, passphrase: bytes | None, days: int) -> None:
        """A new CA: its key and certificate here, the certificate also in ``server/ca.crt``."""
        key, cert = make_ca(days)
        self.write(key, cert, passphrase)
        write_file(server / "ca.crt", cert.public_bytes(serialization.Encoding.PEM))

    def issue_server(self, server: Path, passphrase: bytes | None, hosts: Sequence[str],
                     days: int) -> None:
        """A new ``server.key``/``server.crt`` in the server folder, valid for ``hosts``.

        Raises:
            CAKeyError: the CA key cannot be opened, or is not the CA of ``server/ca.crt``.
        """
        ca_key, ca_cert = self.load(passphrase)
        if ca_cert.public_bytes(serialization.Encoding.PEM) != (server / "ca.crt").read_bytes():
            raise CAKeyError(f"{self.folder} is not the CA of {server} (its ca.crt differs "
                             f"from {server / 'ca.crt'})")
        key, cert = make_server_cert(ca_key, ca_cert, hosts, days)
        write_file(server / "server.key", pem_key(key), private=True)
        write_file(server / "server.crt", cert.public_bytes(serialization.Encoding.PEM))

    def load(self, passphrase: bytes | None) -> tuple[ec.EllipticCurvePrivateKey,
                                                      x509.Certificate]:
        """The CA key and certificate, checked to belong together.

        Raises:
            CAKeyError: missing, passphrase missing or wrong, or key and certificate differ.
        """
        if not self.key.is_file():
            raise CAKeyError(f"{self.key} not found: pass the CA folder written by `provision "
                             "init` as --ca-dir (bring it back online for this step)")
        try:
            key = serialization.load_pem_private_key(
                self.key.read_bytes(), password=passphrase if self.encrypted() else None)
        except TypeError:
            raise CAKeyError(f"{self.key} is protected by a passphrase: give "
                             f"--ca-passphrase-file FILE or set {PASSPHRASE_ENV}") from None
        except ValueError:
            raise CAKeyError(f"{self.key}: wrong passphrase, or the file is damaged") from None
        cert = x509.load_pem_x509_certificate(self.cert.read_bytes())
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
            raise CAKeyError(f"{self.key} is not the key of {self.cert}")
        return key, cert


def read_passphrase(file: Path | None, *, new: bool) -> bytes | None:
    """The passphrase from ``file``, else ``$MEDFED_CA_PASSPHRASE``, else a terminal prompt.

    Args:
        file: ``--ca-passphrase-file`` (its first line is the passphrase).
        new: for a new key: prompt twice and require :data:`MIN_PASSPHRASE` characters.

    Returns:
        The passphrase, or None when there is no file, no variable and no terminal.

    Raises:
        CAKeyError: the file is unreadable or empty, the prompts differ, or it is too short.
    """
    if file is not None:
        try:
            lines = file.read_bytes().splitlines()
        except OSError as err:
            raise CAKeyError(f"--ca-passphrase-file {file}: {err.strerror or err}") from None
        value, source = (lines[0] if lines else b""), f"--ca-passphrase-file {file}"
    elif os.environ.get(PASSPHRASE_ENV):
        value, source = os.environ[PASSPHRASE_ENV].encode(), PASSPHRASE_ENV
    elif sys.stdin.isatty():
        value, source = getpass.getpass("CA key passphrase: ").encode(), "the passphrase typed"
        if new and getpass.getpass("The same again: ").encode() != value:
            raise CAKeyError("the two passphrases typed differ; nothing was written")
    else:
        return None
    if not value:
        raise CAKeyError(f"{source} is empty")
    if new and len(value) < MIN_PASSPHRASE:
        raise CAKeyError(f"{source}: a CA key passphrase needs at least {MIN_PASSPHRASE} "
                         "characters")
    return value


def new_key_passphrase(file: Path | None, *, allow_plain: bool) -> bytes | None:
    """The passphrase for a new CA key; None only when ``allow_plain`` (--no-ca-passphrase).

    Raises:
        CAKeyError: none was given and ``allow_plain`` is not set (or see :func:`read_passphrase`).
    """
    passphrase = None if allow_plain else read_passphrase(file, new=True)
    if passphrase is None and not allow_plain:
        raise CAKeyError(f"the CA key needs a passphrase: give --ca-passphrase-file FILE or set "
                         f"{PASSPHRASE_ENV} (or run at a terminal to be asked); "
                         "--no-ca-passphrase writes it unencrypted")
    return passphrase


def add_ca_options(cmd: argparse.ArgumentParser) -> None:
    """``--ca-dir``, ``--ca-passphrase-file`` and ``--no-ca-passphrase``."""
    cmd.add_argument("--ca-dir", type=Path,
                     help="the CA's folder, kept offline (default: OUT-ca beside --out)")
    secret = cmd.add_mutually_exclusive_group()
    secret.add_argument("--ca-passphrase-file", type=Path,
                        help=f"file whose first line is the CA key's passphrase (else "
                             f"${PASSPHRASE_ENV}, else asked at a terminal)")
    secret.add_argument("--no-ca-passphrase", action="store_true",
                        help="write a new CA key unencrypted (a warning is printed)")


def cli_passphrase(ca: OfflineCA, file: Path | None, *, new: bool, allow_plain: bool
                   ) -> bytes | None:
    """The passphrase a command needs: for a new CA key, or to open the current one.

    A new key without one is written only with ``allow_plain``, and a warning is
    printed on stderr.
    """
    if not new:
        needed = ca.key.is_file() and ca.encrypted()
        return read_passphrase(file, new=False) if needed else None
    passphrase = new_key_passphrase(file, allow_plain=allow_plain)
    if passphrase is None:
        print(f"warning: the CA key {ca.key} is written UNENCRYPTED (--no-ca-passphrase): "
              "whoever copies it can issue a server certificate the hospitals trust",
              file=sys.stderr)
    return passphrase
