"""Fingerprints the two sides read out to each other: a hospital's public key, the CA certificate.

A hospital hands over its public key and receives the federation's CA
certificate as files; comparing these short digests over a second channel
(the phone) shows that neither file was swapped on the way. Both are the
formats standard tools print, so either side can check without MedFed:
``ssh-keygen -lf NAME.pub`` and ``openssl x509 -noout -fingerprint -sha256 -in ca.crt``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib

from cryptography import x509
from cryptography.hazmat.primitives import serialization


def key_fingerprint(openssh_public: bytes) -> str:
    """``SHA256:...`` of an OpenSSH public key line, as ``ssh-keygen -l`` prints it.

    Args:
        openssh_public: ``TYPE BASE64 [COMMENT]``; the comment is ignored.

    Raises:
        ValueError: not an OpenSSH public key line.
    """
    fields = openssh_public.split()
    try:
        blob = base64.b64decode(fields[1], validate=True)
    except (IndexError, binascii.Error):
        raise ValueError("not an OpenSSH public key line (TYPE BASE64 [COMMENT])") from None
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return f"SHA256:{digest}"


def certificate_fingerprint(pem: bytes) -> str:
    """``SHA256:AB:CD:...`` of a PEM certificate's DER bytes, as ``openssl x509 -fingerprint``.

    Raises:
        ValueError: not a PEM certificate.
    """
    der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    return "SHA256:" + ":".join(f"{byte:02X}" for byte in hashlib.sha256(der).digest())
