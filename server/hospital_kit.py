"""A hospital's startup folder: the CA certificate, its settings and a README; no secret.

    KIT/ca.crt          the federation's CA certificate (checks the server)
    KIT/hospital.toml   server address, hospital name, its number, key and CA file names
    KIT/README.md       what the hospital runs: keygen, then its node

The hospital's key pair is made later in the same folder by the hospital
itself (``python -m client keygen --kit KIT``: ``private/NAME.key`` and
``NAME.pub``); the coordinating site never writes a hospital's private key.
"""

from __future__ import annotations

import json
from pathlib import Path

from server.pki import write_file

KIT_FILE = "hospital.toml"


def toml_text(values: dict[str, object]) -> str:
    """Flat TOML of strings, ints and lists of them (JSON literals are valid TOML)."""
    lines = []
    for key, value in values.items():
        if isinstance(value, list):
            lines.append(f"{key} = [{', '.join(json.dumps(v) for v in value)}]")
        else:
            lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


HOSPITAL_README = """# MedFed startup folder for hospital `{name}`

This folder holds no secret. `ca.crt` lets this hospital check it talks to
the real server; `hospital.toml` holds the server's address ({address}) and
this hospital's name and number. Outbound TCP to {address} is all the node
needs. The folder came by one channel: before trusting `ca.crt`, compare the
CA fingerprint that keygen (step 2) prints with the one the coordinating site
reads to you over another (the phone; they see it in `provision show`).

1. Install MedFed once (Python 3.11+), in a checkout of its repository:

       python3 -m venv .venv && .venv/bin/pip install "torch==2.13.*" -e .

2. Make this hospital's own key pair, once (its private key never leaves
   this hospital; the coordinating site never sees it):

       .venv/bin/python -m client keygen --kit /path/to/this/folder

   It writes `private/{name}.key` (mode 0600, folder 0700) and `{name}.pub`
   and prints the key's fingerprint. Send `{name}.pub` to the coordinating
   site, then read them the fingerprint over the phone: they take the key in
   with `python -m server.provision add-key` and see the same one.

3. Start this hospital's node and leave it running (Ctrl-C stops it). It
   waits for the server if the server is not up yet, and reconnects when the
   server restarts:

       .venv/bin/python -m client --kit /path/to/this/folder \\
           --data-path /path/to/{name}/images --ledger-path /secure/{name}-privacy.json

   Add `--device cuda` to train on a GPU and `--max-epsilon 8` to cap the
   differential-privacy budget ever spent on this hospital's images.

To replace the key (lost, or possibly copied): `keygen --kit DIR --force`,
send the new `{name}.pub`; the coordinating site runs `provision rekey`,
after which the old key is refused.
"""


def write_kit(kit: Path, *, name: str, index: int, count: int, address: str,
              ca_pem: bytes) -> None:
    """Write hospital ``name``'s startup folder ``kit`` (number ``index`` of ``count``).

    Args:
        kit: the folder to write.
        name: the hospital's name.
        index: its partition number, 0-based.
        count: hospitals in the federation.
        address: HOST:PORT of the server.
        ca_pem: the federation's CA certificate (PEM).
    """
    write_file(kit / "ca.crt", ca_pem)
    write_file(kit / KIT_FILE, toml_text({"hospital-name": name, "superlink": address,
                                          "partition-id": index, "num-partitions": count,
                                          "key": f"private/{name}.key", "ca": "ca.crt"}).encode())
    write_file(kit / "README.md", HOSPITAL_README.format(name=name, address=address).encode())
