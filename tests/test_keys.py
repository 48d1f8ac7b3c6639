"""Keys the hospital owns: keygen at the hospital, add-key at the coordinator, no private key
written by provisioning, and no node without a CA certificate unless --insecure."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from client.__main__ import main as client_main
from client.keys import keygen
from client.node import read_kit
from common.fingerprint import certificate_fingerprint, key_fingerprint
from server.provision import main as provision_main
from server.registry import fingerprint as registry_fingerprint
from server.superlink import Certificates
from tests.conftest import ROOT

PRIVATE_MARKS = (b"PRIVATE KEY", b"OPENSSH PRIVATE", b"openssh-key-v1")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def private_files(*folders: Path) -> set[Path]:
    """Every file under ``folders`` holding a private key of any format."""
    return {p for folder in folders for p in folder.rglob("*")
            if p.is_file() and any(mark in p.read_bytes() for mark in PRIVATE_MARKS)}


@pytest.fixture
def deploy(tmp_path: Path) -> Path:
    secret = tmp_path / "passphrase.txt"
    secret.write_text("correct horse battery staple\n")
    out = tmp_path / "deploy"
    assert provision_main(["init", "--out", str(out), "--server-address", "127.0.0.1:9092",
                           "--hospitals", "site-a", "site-b",
                           "--ca-passphrase-file", str(secret)]) == 0
    return out


def test_provision_never_writes_a_hospital_private_key(
        deploy: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """init, add, add-key, rekey and renew: the only private keys anywhere are the server's
    TLS key and the (encrypted) CA key, which lives outside the federation folder."""
    kit_a = deploy / "hospitals" / "site-a"
    assert client_main(["keygen", "--kit", str(kit_a)]) == 0
    assert provision_main(["add-key", "--out", str(deploy), "site-a",
                           str(kit_a / "site-a.pub")]) == 0
    assert provision_main(["add", "--out", str(deploy), "--hospitals", "site-c"]) == 0
    assert client_main(["keygen", "--kit", str(kit_a), "--force"]) == 0
    assert provision_main(["rekey", "--out", str(deploy), "site-a",
                           str(kit_a / "site-a.pub")]) == 0
    monkeypatch.setenv("MEDFED_CA_PASSPHRASE", "correct horse battery staple")
    assert provision_main(["renew", "--out", str(deploy), "--ca"]) == 0  # new CA, new kits' ca.crt
    capsys.readouterr()
    hospital_key = kit_a / "private" / "site-a.key"  # made by keygen, at the hospital
    ca_dir = tmp_path / "deploy-ca"
    assert private_files(deploy, ca_dir) == {deploy / "server" / "server.key",
                                             ca_dir / "ca.key", hospital_key}
    assert not (deploy / "ca.key").exists() and not (deploy / "server" / "ca.key").exists()
    assert (ca_dir / "ca.key").read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY")
    for path in (deploy / "server" / "server.key", ca_dir / "ca.key", hospital_key):
        assert (mode(path), mode(path.parent)) == (0o600, 0o700), path
    for kit in ("site-b", "site-c"):  # no keygen there yet: the kit holds no secret at all
        assert sorted(p.name for p in (deploy / "hospitals" / kit).iterdir()) == [
            "README.md", "ca.crt", "hospital.toml"]


def test_keygen_makes_an_openssh_p384_pair_and_both_sides_see_one_fingerprint(
        deploy: Path, capsys: pytest.CaptureFixture) -> None:
    kit = deploy / "hospitals" / "site-b"
    assert client_main(["keygen", "--kit", str(kit)]) == 0
    printed = capsys.readouterr().out
    private = serialization.load_ssh_private_key((kit / "private" / "site-b.key").read_bytes(),
                                                 password=None)
    public = serialization.load_ssh_public_key((kit / "site-b.pub").read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert isinstance(private.curve, ec.SECP384R1) and private.public_key() == public
    fingerprint = key_fingerprint((kit / "site-b.pub").read_bytes())
    assert f"key fingerprint: {fingerprint}" in printed
    assert certificate_fingerprint((kit / "ca.crt").read_bytes()) in printed
    ssh = subprocess.run(["ssh-keygen", "-lf", str(kit / "site-b.pub")], capture_output=True,
                         text=True, check=True)
    assert ssh.stdout.split()[1] == fingerprint  # the standard tool agrees
    assert provision_main(["add-key", "--out", str(deploy), "site-b",
                           str(kit / "site-b.pub")]) == 0
    assert f"fingerprint {fingerprint}" in capsys.readouterr().out  # the coordinator's side
    on_file = deploy / "server" / "hospitals" / "site-b.pub"
    assert registry_fingerprint(on_file) == fingerprint  # what the server registers
    assert list(Certificates(deploy / "server").hospital_keys()) == ["site-b"]
    assert provision_main(["show", "--out", str(deploy)]) == 0
    shown = capsys.readouterr().out
    assert f"site-b: {fingerprint}" in shown and "site-a: no key yet" in shown


def test_keygen_never_overwrites_a_key_without_force(deploy: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    kit = deploy / "hospitals" / "site-a"
    assert client_main(["keygen", "--kit", str(kit)]) == 0
    key = kit / "private" / "site-a.key"
    first = key.read_bytes()
    capsys.readouterr()
    assert client_main(["keygen", "--kit", str(kit)]) == 2
    err = capsys.readouterr().err
    assert f"{key} exists" in err and "--force" in err and len(err.strip().splitlines()) == 1
    assert key.read_bytes() == first
    assert client_main(["keygen", "--kit", str(kit), "--force"]) == 0
    assert key.read_bytes() != first and mode(key) == 0o600
    assert sorted(p.name for p in key.parent.iterdir()) == ["site-a.key"]  # no temp left
    assert client_main(["keygen", "--kit", str(deploy)]) == 2  # not a startup folder
    assert "hospital.toml not found" in capsys.readouterr().err


def _public_line(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                         serialization.PublicFormat.OpenSSH)


def test_add_key_refuses_what_is_not_a_p384_public_key(deploy: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    p256 = ec.generate_private_key(ec.SECP256R1())
    files = {"p256.pub": (_public_line(p256), "EC secp256r1 key"),
             "ed.pub": (_public_line(ed25519.Ed25519PrivateKey.generate()), "Ed25519 key"),
             "junk.pub": (b"ecdsa-sha2-nistp384 not-base64!!\n", "not an OpenSSH public key"),
             "private.key": (p256.private_bytes(serialization.Encoding.PEM,
                                                serialization.PrivateFormat.OpenSSH,
                                                serialization.NoEncryption()), "PRIVATE key")}
    for name, (data, _) in files.items():
        (tmp_path / name).write_bytes(data)
    for name, (_, reason) in [*files.items(), ("missing.pub", ("", "No such file"))]:
        assert provision_main(["add-key", "--out", str(deploy), "site-a",
                               str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert str(tmp_path / name) in err and reason in err, err
    assert provision_main(["add-key", "--out", str(deploy), "site-z",
                           str(tmp_path / "p256.pub")]) == 2
    assert "no hospital 'site-z'" in capsys.readouterr().err
    assert not list((deploy / "server" / "hospitals").glob("*.pub"))  # nothing taken in


def test_add_key_keeps_one_key_per_hospital(deploy: Path, capsys: pytest.CaptureFixture
                                            ) -> None:
    kit_a, kit_b = deploy / "hospitals" / "site-a", deploy / "hospitals" / "site-b"
    pub_a = keygen(read_kit(kit_a))
    pub_b = keygen(read_kit(kit_b))
    assert provision_main(["add-key", "--out", str(deploy), "site-a", str(pub_a)]) == 0
    assert provision_main(["add-key", "--out", str(deploy), "site-a", str(pub_a)]) == 0  # again
    assert provision_main(["add-key", "--out", str(deploy), "site-b", str(pub_a)]) == 2
    assert "is the key of site-a" in capsys.readouterr().err
    on_file = deploy / "server" / "hospitals" / "site-a.pub"
    assert provision_main(["add-key", "--out", str(deploy), "site-a", str(pub_b)]) == 2
    assert "site-a has a key on file already" in capsys.readouterr().err
    assert key_fingerprint(on_file.read_bytes()) == key_fingerprint(pub_a.read_bytes())
    old = deploy.parent / "old-site-a.pub"
    old.write_bytes(pub_a.read_bytes())
    keygen(read_kit(kit_a), force=True)
    assert provision_main(["rekey", "--out", str(deploy), "site-a", str(pub_a)]) == 0
    assert key_fingerprint(on_file.read_bytes()) == key_fingerprint(pub_a.read_bytes())
    replaced = list((deploy / "server" / "hospitals" / "replaced").glob("site-a.*.pub"))
    assert [p.read_bytes() for p in replaced] == [old.read_bytes()]  # kept, not lost
    assert list(Certificates(deploy / "server").hospital_keys()) == ["site-a"]  # not registered
    capsys.readouterr()
    assert provision_main(["rekey", "--out", str(deploy), "site-a", str(old)]) == 2
    assert "retired" in capsys.readouterr().err  # a replaced key does not come back


def test_client_needs_a_ca_or_an_explicit_insecure(deploy: Path) -> None:
    """A real ``python -m client`` process: no CA and no --insecure is one line and exit 2."""
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    base = [sys.executable, "-m", "client", "--superlink", "127.0.0.1:1", "--name", "x",
            "--partition-id", "0", "--num-partitions", "1"]
    done = subprocess.run(base, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.startswith("error: no CA certificate") and "--insecure" in done.stderr
    kit = deploy / "hospitals" / "site-a"  # a kit whose hospital has not made its key yet
    done = subprocess.run([sys.executable, "-m", "client", "--kit", str(kit)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert f"python -m client keygen --kit {kit}" in done.stderr
