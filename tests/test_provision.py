"""Provisioning and the hospital's setup checks: files, permissions, keys, certificates."""

from __future__ import annotations

import datetime as dt
import os
import pty
import select
import signal
import stat
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    load_ssh_private_key,
    load_ssh_public_key,
)
from flwr.common.config import parse_config_args

from client.__main__ import main as client_main
from client.keys import keygen
from client.node import (
    HospitalSettings,
    Link,
    NodeSetupError,
    read_kit,
    refusal,
    supernode_argv,
    write_node_config,
)
from server.ca_key import CAKeyError, OfflineCA
from server.provision import add, add_key, init, main, read_federation, renew
from server.registry import fingerprint
from server.superlink import CertificateError, Certificates
from tests.conftest import ROOT

HOSPITALS = ["site-a", "site-b", "site-c"]
PASSPHRASE = b"correct horse battery staple"


@pytest.fixture
def fed(tmp_path: Path) -> Path:
    """A federation whose hospitals made their keys and whose coordinator took them in."""
    out = tmp_path / "deploy"
    init(out, server_address="coordinator.example.org:9092", hospitals=HOSPITALS,
         hosts=["coordinator.example.org", "10.0.0.5"])
    for name in HOSPITALS:
        add_key(out, name, keygen(read_kit(out / "hospitals" / name)))
    return out


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_private_keys_are_owner_only(fed: Path) -> None:
    private = [fed.parent / "deploy-ca" / "ca.key", fed / "server" / "server.key",
               *(fed / "hospitals" / h / "private" / f"{h}.key" for h in HOSPITALS)]
    for path in private:
        assert mode(path) == 0o600, path
        assert mode(path.parent) == 0o700, path.parent


def test_hospital_keys_are_p384_openssh_pairs(fed: Path) -> None:
    for name in HOSPITALS:
        kit = read_kit(fed / "hospitals" / name)
        private = load_ssh_private_key(kit.key.read_bytes(), password=None)
        public = load_ssh_public_key((fed / "server" / "hospitals" / f"{name}.pub").read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert isinstance(private.curve, ec.SECP384R1)
        assert private.public_key() == public  # the key on file is the one the hospital made


def test_server_certificate_chains_to_the_ca_and_names_the_hosts(fed: Path) -> None:
    ca = x509.load_pem_x509_certificate((fed / "server" / "ca.crt").read_bytes())
    cert = x509.load_pem_x509_certificate((fed / "server" / "server.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["coordinator.example.org", "localhost"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["10.0.0.5",
                                                                             "127.0.0.1"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for name in HOSPITALS:  # every kit trusts the same CA
        assert (fed / "hospitals" / name / "ca.crt").read_bytes() == ca.public_bytes(
            Encoding.PEM)


def test_startup_folder_names_server_hospital_and_its_number(fed: Path) -> None:
    kit = read_kit(fed / "hospitals" / "site-b")
    assert (kit.name, kit.superlink, kit.partition_id, kit.num_partitions) == (
        "site-b", "coordinator.example.org:9092", 1, 3)
    assert kit.key.is_file() and kit.ca.is_file()
    readme = (fed / "hospitals" / "site-b" / "README.md").read_text()
    assert "python -m client --kit" in readme and "pip install" in readme
    assert "python -m client keygen --kit" in readme and "holds no secret" in readme


def test_add_rekey_and_renew(fed: Path) -> None:
    old_key = fingerprint(fed / "server" / "hospitals" / "site-b.pub")
    old_cert = (fed / "server" / "server.crt").read_bytes()
    old_ca = (fed / "server" / "ca.crt").read_bytes()
    add(fed, ["site-d"])
    assert read_kit(fed / "hospitals" / "site-d").partition_id == 3
    assert read_federation(fed).hospitals == [*HOSPITALS, "site-d"]
    new_pub = keygen(read_kit(fed / "hospitals" / "site-b"), force=True)  # at the hospital
    add_key(fed, "site-b", new_pub, replace=True)  # `provision rekey` at the coordinator
    assert fingerprint(fed / "server" / "hospitals" / "site-b.pub") != old_key
    renew(fed)
    assert (fed / "server" / "server.crt").read_bytes() != old_cert
    assert (fed / "server" / "ca.crt").read_bytes() == old_ca  # hospitals keep their ca.crt
    renew(fed, new_ca=True)
    new_ca = (fed / "server" / "ca.crt").read_bytes()
    assert new_ca != old_ca
    assert all((fed / "hospitals" / h / "ca.crt").read_bytes() == new_ca
               for h in [*HOSPITALS, "site-d"])


def test_cli_refuses_to_overwrite_or_duplicate(fed: Path, capsys: pytest.CaptureFixture
                                               ) -> None:
    assert main(["init", "--out", str(fed), "--server-address", "h:1",
                 "--hospitals", "x"]) == 2
    assert "already holds a federation" in capsys.readouterr().err
    assert main(["add", "--out", str(fed), "--hospitals", "site-a"]) == 2
    assert "already part of the federation" in capsys.readouterr().err
    assert main(["add", "--out", str(fed), "--hospitals", "bad/name"]) == 2
    assert main(["init", "--out", str(fed.parent / "x"), "--server-address", "no-port",
                 "--hospitals", "a"]) == 2
    assert "must be HOST:PORT" in capsys.readouterr().err
    fresh = ["init", "--out", str(fed.parent / "y"), "--server-address", "h:1", "--hospitals", "a"]
    assert main(fresh) == 2  # no passphrase, no terminal, no --no-ca-passphrase
    assert "the CA key needs a passphrase" in capsys.readouterr().err
    assert not (fed.parent / "y").exists()
    assert main([*fresh, "--ca-dir", str(fed.parent / "y" / "ca"), "--no-ca-passphrase"]) == 2
    assert "lies inside the federation folder" in capsys.readouterr().err
    assert main([*fresh, "--no-ca-passphrase"]) == 0
    assert "UNENCRYPTED" in capsys.readouterr().err
    assert not OfflineCA(fed.parent / "y-ca").encrypted()
    assert main(["show", "--out", str(fed)]) == 0
    assert "server certificate expires" in capsys.readouterr().out


def test_server_checks_certificates(fed: Path) -> None:
    certs = Certificates(fed / "server")
    assert certs.check() == []
    assert list(certs.hospital_keys()) == HOSPITALS
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=340)
    assert any("expires on" in w for w in certs.check(now=later))
    with pytest.raises(CertificateError, match="expired"):
        certs.check(now=later + dt.timedelta(days=60))
    (fed / "server" / "server.key").unlink()
    with pytest.raises(CertificateError, match="server.key not found"):
        certs.check()


def test_ca_key_is_encrypted_and_renew_needs_its_passphrase(
        tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    out, ca = tmp_path / "deploy", OfflineCA(tmp_path / "offline")
    init(out, server_address="127.0.0.1:9092", hospitals=["site-a"], ca_dir=ca.folder,
         ca_passphrase=PASSPHRASE)
    assert ca.encrypted() and ca.key.read_bytes().startswith(b"-----BEGIN ENCRYPTED")
    with pytest.raises(CAKeyError, match="protected by a passphrase"):
        ca.load(None)
    with pytest.raises(CAKeyError, match="wrong passphrase"):
        ca.load(b"not the passphrase at all")
    assert ca.load(PASSPHRASE)[1].public_bytes(Encoding.PEM) == (out / "server" / "ca.crt"
                                                                  ).read_bytes()
    old_cert = (out / "server" / "server.crt").read_bytes()
    renew_cli = ["renew", "--out", str(out), "--ca-dir", str(ca.folder)]
    assert main(renew_cli) == 2
    assert "protected by a passphrase" in capsys.readouterr().err
    assert (out / "server" / "server.crt").read_bytes() == old_cert  # nothing changed
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"wrong passphrase, long\n")
    assert main([*renew_cli, "--ca-passphrase-file", str(secret)]) == 2
    assert "wrong passphrase" in capsys.readouterr().err
    secret.write_bytes(PASSPHRASE + b"\n")
    assert main([*renew_cli, "--ca-passphrase-file", str(secret)]) == 0
    new_cert = x509.load_pem_x509_certificate((out / "server" / "server.crt").read_bytes())
    new_cert.verify_directly_issued_by(ca.load(PASSPHRASE)[1])
    assert new_cert.public_bytes(Encoding.PEM) != old_cert
    monkeypatch.setenv("MEDFED_CA_PASSPHRASE", "short")
    assert main([*renew_cli, "--ca"]) == 2  # a new CA key needs a long passphrase
    assert "at least 12 characters" in capsys.readouterr().err
    monkeypatch.setenv("MEDFED_CA_PASSPHRASE", PASSPHRASE.decode())
    assert main(renew_cli) == 0
    assert not (out / "ca.key").exists() and not list(out.rglob("ca.key"))


def at_terminal(argv: list[str], answers: list[bytes], timeout_s: float = 120) -> tuple[int, str]:
    """Run ``python ARGV`` on a pseudo-terminal, typing each answer after a prompt (``...: ``).

    The child is killed (by its PID) if it outlives ``timeout_s``.
    """
    pid, fd = pty.fork()
    if pid == 0:  # the child: a real process whose stdin is a terminal
        try:
            os.chdir(ROOT)
            os.execv(sys.executable, [sys.executable, *argv])
        finally:
            os._exit(127)
    out, pending, deadline = b"", list(answers), time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if select.select([fd], [], [], 0.5)[0]:
            try:
                out += os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                break
            if pending and out.endswith(b": "):  # a prompt, its terminal already set up
                os.write(fd, pending.pop(0) + b"\n")
    else:
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return os.waitstatus_to_exitcode(status), out.decode(errors="replace")


def test_ca_passphrase_is_asked_at_a_terminal(tmp_path: Path) -> None:
    out, typed = tmp_path / "deploy", b"typed at the terminal"
    init_cli = ["-m", "server.provision", "init", "--out", str(out), "--server-address",
                "127.0.0.1:9092", "--hospitals", "site-a"]
    code, text = at_terminal(init_cli, [typed, b"something else entirely"])
    assert code == 2 and "the two passphrases typed differ" in text and not out.exists()
    code, text = at_terminal(init_cli, [typed, typed])
    assert code == 0 and "CA key passphrase:" in text and "The same again:" in text
    ca = OfflineCA(tmp_path / "deploy-ca")
    assert ca.encrypted() and ca.load(typed)
    code, text = at_terminal(["-m", "server.provision", "renew", "--out", str(out)], [typed])
    assert code == 0 and "new certificate written" in text


def test_node_config_reaches_flower_intact(tmp_path: Path) -> None:
    odd = tmp_path / 'data "quoted" dir with spaces ü'
    settings = HospitalSettings(name="site-a", partition_id=1, num_partitions=3,
                                data_path=str(odd), device="cpu", max_epsilon=8.0, delta=1e-5,
                                ledger_path=str(tmp_path / "ledger.json"))
    path = write_node_config(settings.node_config(), tmp_path / "node-config.toml")
    split = {"split-seed": 0, "val-fraction": 0.15, "test-fraction": 0.2, "slice-block": 8}
    assert parse_config_args([str(path)]) == {
        "hospital-name": "site-a", "partition-id": 1, "num-partitions": 3,
        "data-path": str(odd), "device": "cpu", "max-epsilon": 8.0, "delta": 1e-5,
        "ledger-path": str(tmp_path / "ledger.json"), **split}
    assert parse_config_args([str(write_node_config(
        HospitalSettings("b", 0, 1).node_config(), tmp_path / "min.toml"))]) == {
        "hospital-name": "b", "partition-id": 0, "num-partitions": 1, "delta": 1e-5, **split}


def test_supernode_command_line(fed: Path, tmp_path: Path) -> None:
    kit = read_kit(fed / "hospitals" / "site-a")
    link = Link(kit.superlink, kit.ca, kit.key, max_wait_time=600)
    argv = supernode_argv(link, tmp_path / "node.toml", port=9555)
    assert argv[argv.index("--superlink") + 1] == "coordinator.example.org:9092"
    assert argv[argv.index("--root-certificates") + 1] == str(kit.ca.resolve())
    assert argv[argv.index("--auth-supernode-private-key") + 1] == str(kit.key.resolve())
    assert argv[argv.index("--port") + 1] == "9555"
    assert argv[argv.index("--max-wait-time") + 1] == "600"
    assert "--insecure" not in argv and "--max-retries" not in argv
    insecure = supernode_argv(Link("127.0.0.1:9092", None, None, insecure=True),
                              tmp_path / "n.toml")
    assert "--insecure" in insecure and "--root-certificates" not in insecure
    with pytest.raises(NodeSetupError, match="no CA certificate"):
        Link("127.0.0.1:9092", None, None)  # never insecure without asking


def test_hospital_settings_are_checked() -> None:
    with pytest.raises(NodeSetupError, match="partition-id 3"):
        HospitalSettings("a", 3, 3)
    with pytest.raises(NodeSetupError, match="max-epsilon"):
        HospitalSettings("a", 0, 3, max_epsilon=0)


def test_client_explains_missing_or_wrong_files(fed: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    kit = fed / "hospitals" / "site-a"
    assert client_main(["--kit", str(kit), "--key", str(tmp_path / "nope.key")]) == 2
    assert "nope.key: file not found" in capsys.readouterr().err
    pub = fed / "server" / "hospitals" / "site-a.pub"
    assert client_main(["--kit", str(kit), "--key", str(pub)]) == 2
    assert "not an OpenSSH private key" in capsys.readouterr().err
    assert client_main(["--kit", str(kit), "--ca", str(pub)]) == 2
    assert "not a PEM certificate" in capsys.readouterr().err
    assert client_main(["--kit", str(tmp_path)]) == 2
    assert "hospital.toml not found" in capsys.readouterr().err
    assert client_main(["--superlink", "h:1", "--name", "a", "--num-partitions", "2",
                        "--insecure"]) == 2
    assert "--partition-id is required" in capsys.readouterr().err
    assert client_main(["--kit", str(kit), "--data-path", str(tmp_path / "none")]) == 2
    assert "is not an existing folder" in capsys.readouterr().err
    (kit / "private" / "site-a.key").unlink()
    assert client_main(["--kit", str(kit)]) == 2
    assert f"no key yet. Make it with `python -m client keygen --kit {kit}`" in (
        capsys.readouterr().err)


def test_refusals_are_explained() -> None:
    assert "not registered" in str(refusal(
        "Failed to initialize the connection to the SuperLink.\n"
        "[code: 2004] Failed to activate SuperNode.", "site-a"))
    assert "TLS failed" in str(refusal("ERROR : SSL/TLS handshake error detected.", "x"))
    assert refusal("INFO : SuperNode ID: 42", "x") is None
