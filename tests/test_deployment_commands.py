"""The deployment commands fail fast, with a message, before starting any process."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.__main__ import main as server_main
from server.provision import init
from server.registry import main as registry_main


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    init(tmp_path / "deploy", server_address="127.0.0.1:9092", hospitals=["site-a"])
    return tmp_path / "deploy" / "server"


def test_server_needs_certificates_or_an_explicit_insecure(
        certs: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert server_main([]) == 2
    assert "pass --certs DIR" in capsys.readouterr().err
    assert server_main(["--certs", str(certs), "--insecure"]) == 2
    assert server_main(["--certs", str(tmp_path / "nowhere")]) == 2
    assert "ca.crt not found" in capsys.readouterr().err


def test_server_reports_config_typos(certs: Path, capsys: pytest.CaptureFixture) -> None:
    assert server_main(["--certs", str(certs), "federation.roundz=3"]) == 2
    assert "unknown config key 'federation.roundz'" in capsys.readouterr().err


def test_server_refuses_the_ca_folder_as_its_certs(certs: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    """The CA folder (kept offline) is not a server folder, and the server folder holds no
    CA key."""
    assert server_main(["--certs", str(tmp_path / "deploy-ca")]) == 2
    assert "server.crt not found" in capsys.readouterr().err
    assert not list(certs.rglob("ca.key")) and (tmp_path / "deploy-ca" / "ca.key").is_file()


def test_registry_needs_the_sites_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert registry_main(["list", "--certs", str(tmp_path)]) == 1
    assert "ca.crt not found" in capsys.readouterr().err
