"""The hospitals' public keys on file at the coordinating site: taken in, checked, described.

    deploy/server/hospitals/NAME.pub           the key hospital NAME made and sent
    deploy/server/hospitals/removed/NAME.pub   a key retired by ``server.registry remove``
    deploy/server/hospitals/replaced/NAME.*.pub  keys replaced by ``provision rekey``, kept

The server registers every ``hospitals/NAME.pub`` with its SuperLink when it
starts (``python -m server.registry add`` for a running one); a replaced key's
old registration is dropped then, so the old key stops working.
"""

from __future__ import annotations

import time
from pathlib import Path

from common.fingerprint import key_fingerprint
from server.pki import node_public_key, write_file


class KeyFileError(ValueError):
    """A public key cannot be taken in (the message names the file and the fix)."""


def key_file(folder: Path, name: str) -> Path:
    """Hospital ``name``'s public key in the server's ``hospitals/`` folder."""
    return folder / f"{name}.pub"


def known_keys(folder: Path) -> dict[str, str]:
    """Fingerprint -> whose key it is, over current, removed and replaced keys in ``folder``."""
    known = {}
    for path in [*sorted(folder.glob("removed/*.pub")), *sorted(folder.glob("replaced/*.pub"))]:
        owner = path.name.split(".")[0]
        known[key_fingerprint(path.read_bytes())] = (
            f"{owner} (retired: Flower never accepts a key again once it was unregistered)")
    for path in sorted(folder.glob("*.pub")):
        known[key_fingerprint(path.read_bytes())] = path.stem
    return known


def take_in(folder: Path, name: str, public_key: Path, *, replace: bool = False) -> str:
    """Check hospital ``name``'s ``public_key`` and put it on file as ``folder/NAME.pub``.

    Args:
        folder: the server's ``hospitals/`` folder.
        name: the hospital.
        public_key: the ``NAME.pub`` it sent (from ``python -m client keygen``).
        replace: allow replacing the key on file (``provision rekey``).

    Returns:
        The key's fingerprint (``SHA256:...``, as ``ssh-keygen -l`` prints it).

    Raises:
        KeyFileError: not an EC P-384 OpenSSH public key (the file is named), a key
            on file already (without ``replace``), or another hospital's or a removed key.
    """
    try:
        line = node_public_key(public_key)
    except ValueError as err:
        raise KeyFileError(str(err)) from None
    new, target = key_fingerprint(line), key_file(folder, name)
    owner = known_keys(folder).get(new)
    if owner == name:
        return new  # this very key is on file already
    if owner is not None:
        raise KeyFileError(f"{public_key} is the key of {owner}: every hospital needs a new "
                           "key of its own (`python -m client keygen --kit DIR --force`)")
    if target.exists() and not replace:
        old = key_fingerprint(target.read_bytes())
        raise KeyFileError(f"{name} has a key on file already ({old}): to replace it use "
                           "`python -m server.provision rekey`")
    if target.exists():  # kept, not lost: it shows which key was registered when
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(target.stat().st_mtime))
        retired = folder / "replaced" / f"{name}.{stamp}.pub"
        retired.parent.mkdir(exist_ok=True)
        target.replace(retired)
    write_file(target, line + f" medfed-{name}\n".encode())
    return new


def key_status(folder: Path, name: str) -> str:
    """Hospital ``name``'s key in a line: its fingerprint, removed, or not sent yet."""
    path = key_file(folder, name)
    if path.is_file():
        return key_fingerprint(path.read_bytes())
    if (folder / "removed" / path.name).is_file():
        return "removed (to re-admit: the hospital runs keygen --force, then `add-key`)"
    return f"no key yet: waiting for {name}.pub (the hospital runs `python -m client keygen`)"
