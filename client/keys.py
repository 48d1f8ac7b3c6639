"""The hospital's own key pair: made at the hospital, only the public half ever leaves.

    python -m client keygen --kit /secure/medfed-site-a           # once
    python -m client keygen --kit /secure/medfed-site-a --force   # replace it (lost or leaked)

The key is EC P-384 in OpenSSH format, as Flower's SuperNode authentication
reads it. The private key goes where the kit's ``hospital.toml`` says
(``private/NAME.key``: mode 0600, folder 0700) and is never overwritten
without ``--force``; the public key ``NAME.pub`` goes beside ``hospital.toml``
for handing to the coordinating site. Both fingerprints printed (the key's
and the CA certificate's) are read out to the coordinating site over a second
channel, so that neither file can be swapped on the way unnoticed.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from client.node import Kit, NodeSetupError, read_kit
from common.atomic import atomic_file
from common.fingerprint import certificate_fingerprint, key_fingerprint


def generate_key_pair(name: str) -> tuple[bytes, bytes]:
    """A new EC P-384 key pair in OpenSSH format.

    Returns:
        (private key file bytes, public key line ``ecdsa-sha2-nistp384 ... medfed-NAME``).
    """
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())  # Flower reads it without one
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    return private, public + f" medfed-{name}\n".encode()


def public_key_path(kit: Kit) -> Path:
    """Where keygen puts the public key to hand over: ``KIT/NAME.pub``."""
    return kit.folder / f"{kit.name}.pub"


def write_private_key(path: Path, data: bytes, *, force: bool) -> None:
    """Write a private key 0600 in a 0700 folder; an existing one only with ``force``.

    With ``force`` the new key replaces the old in one step (the old one stays
    if anything fails); without it an existing file is never touched.

    Raises:
        NodeSetupError: the key exists and ``force`` is not set.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.parent.chmod(0o700)
    if force:
        with atomic_file(path) as handle:  # a mkstemp file: 0600 from the start
            handle.write(data)
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise NodeSetupError(
            f"{path} exists: this hospital has a key already. Keep it; to replace it "
            "(lost or leaked), run again with --force and send the new .pub to the "
            "coordinating site (the old key stops working once they take in the new one)"
        ) from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def keygen(kit: Kit, *, force: bool = False) -> Path:
    """Make the hospital's key pair in its kit; returns the public key file.

    Raises:
        NodeSetupError: the key exists (and not ``force``).
    """
    private, public = generate_key_pair(kit.name)
    write_private_key(kit.key, private, force=force)
    with atomic_file(public_key_path(kit)) as handle:
        handle.write(public)
    os.chmod(public_key_path(kit), 0o644)
    return public_key_path(kit)


def handover_text(kit: Kit, public: Path) -> str:
    """What keygen prints: the files, the public key, and the two fingerprints to compare."""
    line = public.read_bytes()
    ca = (f"CA certificate fingerprint ({kit.ca}): {certificate_fingerprint(kit.ca.read_bytes())}"
          if kit.ca.is_file() else f"(no CA certificate at {kit.ca} yet)")
    return (f"private key: {kit.key} (mode 0600; it never leaves this hospital)\n"
            f"public key:  {public} -- send this file to the coordinating site\n"
            f"  {line.decode().strip()}\n"
            f"key fingerprint: {key_fingerprint(line)}\n"
            f"{ca}\n"
            "Read both fingerprints to the coordinating site over another channel than the "
            "one carrying the file (a phone call): `python -m server.provision add-key` prints "
            "the same key fingerprint there, and `provision show` the CA's.")


def main(argv: Sequence[str]) -> int:
    """``python -m client keygen``; returns the exit code (2: refused, with a message)."""
    parser = argparse.ArgumentParser(prog="python -m client keygen", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kit", type=Path, required=True,
                        help="this hospital's startup folder (with hospital.toml)")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing key (the old one then stops working)")
    args = parser.parse_args(list(argv))
    try:
        kit = read_kit(args.kit)
        public = keygen(kit, force=args.force)
    except (NodeSetupError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(handover_text(kit, public))
    return 0
