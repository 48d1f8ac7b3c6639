"""Code approval at the hospital: bundle hashes, the apps/approve commands, and a real refusal.

The last test runs real processes on loopback (an insecure SuperLink and one
hospital: TLS is not what it tests; the TLS deployment tests run with
approval on too): a bundle the hospital has not approved is refused before
any of its code runs, and runs once approved. It also checks the hospital's
audit record of that run with ``python -m client audit``.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from client.approval import AppStore, approve_fab
from client.approval import main as approval_main
from client.bundle import BundleError, build_from_source, read_bundle
from common.compose import compose_settings, finalize
from common.config import Settings
from common.processes import ManagedProcess, free_port
from server.registry import wait_for_hospitals
from server.runner import RunFailedError, submit_and_follow
from server.superlink import serving
from tests.conftest import ROOT, stop_leftovers

MARKER_APP = '''"""MedFed's ClientApp, unchanged, behind a module that marks its import."""
from pathlib import Path

Path({marker!r}).write_text("the bundle's code ran")

from client import app as medfed  # noqa: E402

app = medfed.app
'''


def project_copy(root: Path, name: str, marker: Path | None = None) -> Path:
    """A copy of this Flower app; with ``marker``, its ClientApp module writes that file."""
    project = root / name
    for package in ("common", "server", "client"):
        shutil.copytree(ROOT / package, project / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    pyproject = (ROOT / "pyproject.toml").read_text()
    if marker is not None:
        (project / "marker_app.py").write_text(MARKER_APP.format(marker=str(marker)))
        pyproject = pyproject.replace('clientapp = "client.app:app"',
                                      'clientapp = "marker_app:app"')
        pyproject = pyproject.replace("fab-include = [", 'fab-include = ["marker_app.py", ')
    (project / "pyproject.toml").write_text(pyproject)
    return project


def rezipped(fab: bytes, compression: int) -> bytes:
    """The same files in a zip written differently (another compressor, other timestamps)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(fab)) as old, zipfile.ZipFile(out, "w", compression) as new:
        for info in reversed(old.infolist()):
            new.writestr(info.filename, old.read(info))
    return out.getvalue()


def test_the_bundle_hash_depends_only_on_the_files(tmp_path: Path) -> None:
    """Same code, built in another folder or zipped differently: same hash (Flower's FAB hash
    changes); one byte changed: another hash. It is `sha256sum` of the files, sorted."""
    fab = build_from_source(project_copy(tmp_path, "one"))
    again = build_from_source(project_copy(tmp_path, "two"))
    bundle = read_bundle(fab)
    assert read_bundle(again).hash == bundle.hash
    stored = rezipped(fab, zipfile.ZIP_STORED)
    assert hashlib.sha256(stored).digest() != hashlib.sha256(fab).digest()
    assert read_bundle(stored).hash == bundle.hash
    assert (bundle.label, bundle.clientapp) == ("medfed/medfed 0.1.0", "client.app:app")
    assert {"client", "common", "server"} <= bundle.top_level

    unpacked = tmp_path / "unpacked"
    zipfile.ZipFile(io.BytesIO(fab)).extractall(unpacked)
    paths = sorted(p.relative_to(unpacked).as_posix() for p in unpacked.rglob("*")
                   if p.is_file() and p.relative_to(unpacked).as_posix() != ".info/CONTENT")
    listing = "".join(f"{hashlib.sha256((unpacked / p).read_bytes()).hexdigest()}  {p}\n"
                      for p in paths)
    assert hashlib.sha256(listing.encode()).hexdigest() == bundle.hash

    changed = project_copy(tmp_path, "three")
    guard = changed / "client" / "guard.py"
    guard.write_text(guard.read_text() + "\n")
    assert read_bundle(build_from_source(changed)).hash != bundle.hash
    with pytest.raises(BundleError, match="not a readable zip"):
        read_bundle(b"not a zip")


def test_apps_lists_offers_and_approve_diff_revoke(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """An offered bundle is kept and listed as not approved; `--diff` shows what changed
    against the approved one; `approve HASH` approves it; bad input names what is wrong."""
    home = tmp_path / "home"
    store = AppStore(home)
    approved = approve_fab(store, build_from_source(project_copy(tmp_path, "medfed")), "test")
    offered_fab = build_from_source(project_copy(tmp_path, "other", tmp_path / "mark"))
    offered = read_bundle(offered_fab)
    store.record_offer(offered, offered_fab, run_id=7)
    store.record_offer(offered, offered_fab, run_id=7)

    assert approval_main(["apps", "--home", str(home)]) == 0
    listing = capsys.readouterr().out
    assert f"{approved.hash}  medfed/medfed 0.1.0  approved" in listing
    assert re.search(f"{offered.hash} .* runs 1  messages 2  NOT APPROVED", listing)
    assert approval_main(["apps", "--home", str(home), "--diff", offered.hash]) == 0
    changes = capsys.readouterr().out
    assert f"+++ {offered.hash[:12]}/marker_app.py" in changes
    assert '-clientapp = "client.app:app"' in changes
    assert "client/guard.py" not in changes  # unchanged files are not shown
    assert approval_main(["apps", "--home", str(home), "--show", offered.hash]) == 0
    assert "marker_app.py" in capsys.readouterr().out

    assert approval_main(["approve", offered.hash, "--home", str(home)]) == 0
    assert offered.hash in store.approved()
    assert approval_main(["approve", "--revoke", offered.hash, "--home", str(home)]) == 0
    assert offered.hash not in store.approved()
    capsys.readouterr()
    assert approval_main(["approve", "ab" * 32, "--home", str(home)]) == 2
    assert "was offered to this hospital" in capsys.readouterr().err
    assert approval_main(["apps"]) == 2
    assert "pass --kit DIR" in capsys.readouterr().err
    store.approved_path.write_text("{not json")
    assert approval_main(["apps", "--home", str(home)]) == 2
    assert f"{store.approved_path} is unreadable" in capsys.readouterr().err


def cli(*argv: str) -> subprocess.CompletedProcess[str]:
    """``python -m client ARGV`` as a hospital runs it."""
    return subprocess.run([sys.executable, "-m", "client", *argv], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)


@pytest.fixture
def started(tmp_path: Path) -> Iterator[list[ManagedProcess]]:
    """Processes a test starts; all stopped by PID at the end, and none may be left."""
    procs: list[ManagedProcess] = []
    try:
        yield procs
    finally:
        for proc in reversed(procs):
            proc.stop(grace_s=5)
        stop_leftovers(tmp_path)


def one_round(tmp_path: Path) -> Settings:
    """One hospital, one training round of a tiny model, no evaluation round."""
    return finalize(compose_settings([
        f"run_dir={tmp_path / 'run'}", "federation.num_hospitals=1", "federation.rounds=1",
        "federation.min_train=1", "federation.fraction_evaluate=0", "federation.min_evaluate=1",
        "data.samples_per_hospital=40", "model.channels=[8,16]", "data.batch_size=16"]),
        base=ROOT)


def check_audit_and_tampering(home: Path, tmp_path: Path) -> None:
    """The real record verifies; an edited metric, a removed entry and a reordered pair are
    each caught by ``python -m client audit``, which names the first bad entry."""
    verified = cli("audit", "--home", str(home))
    assert verified.returncode == 0, verified.stderr
    assert "2 entries, chain verified" in verified.stdout
    lines = (home / "audit.jsonl").read_text().splitlines()
    refusal, trained = (json.loads(line) for line in lines)
    assert refusal["error"]["code"] == 4005 and refusal["arrays"] == []
    assert trained["error"] is None and trained["round"] == 1 and trained["app_hash"]
    assert all(len(a["sha256"]) == 64 for a in trained["arrays"]) and trained["arrays"]
    metric_record = next(iter(trained["metrics"]))
    key = next(iter(trained["metrics"][metric_record]))
    trained["metrics"][metric_record][key] = trained["metrics"][metric_record][key] + 1
    edited = [lines[0], json.dumps(trained)]
    for name, content, where in (("edited", edited, "line 2 (seq 2): its content does not "
                                  "match its hash"), ("removed", lines[1:], "line 1 (seq 2)"),
                                 ("reordered", lines[::-1], "line 1 (seq 2)")):
        copy = tmp_path / f"audit-{name}"
        copy.mkdir()
        (copy / "audit.jsonl").write_text("\n".join(content) + "\n")
        broken = cli("audit", "--home", str(copy))
        assert broken.returncode == 1, (name, broken.stdout)
        assert where in broken.stderr, (name, broken.stderr)


@pytest.mark.slow
def test_an_unapproved_bundle_is_refused_until_approved(tmp_path: Path,
                                                        started: list[ManagedProcess]) -> None:
    """The hospital approved MedFed; the coordinator ships a changed ClientApp. Nothing of it
    runs (its import marker never appears), only the refusal leaves, the hospital's log names
    the hash; after `python -m client approve HASH` the same bundle runs."""
    home, port, marker = tmp_path / "home", free_port(), tmp_path / "marker"
    assert cli("approve", "--source", str(ROOT), "--home", str(home)).returncode == 0
    project = project_copy(tmp_path, "changed", marker)
    offered = read_bundle(build_from_source(project)).hash
    hospital = ManagedProcess("hospital", [
        sys.executable, "-m", "client", "--insecure", "--superlink", f"127.0.0.1:{port}",
        "--name", "site-a", "--partition-id", "0", "--num-partitions", "1",
        "--home", str(home)], tmp_path / "hospital.out", cwd=ROOT)
    started.append(hospital.start())
    settings, flwr_home = one_round(tmp_path), tmp_path / "flwr-home"
    with serving(host="127.0.0.1", port=port, certs=None, database=tmp_path / "superlink.db",
                 log_dir=tmp_path, flwr_home=flwr_home) as conn:
        wait_for_hospitals(conn, flwr_home, count=1, timeout_s=120)
        with pytest.raises(RunFailedError):
            submit_and_follow(settings, conn, project_dir=project, flwr_home=flwr_home)
        node_log = (home / "node.log").read_text()
        assert f"refused app bundle {offered}" in node_log
        assert f"python -m client approve {offered}" in node_log
        assert node_log.count("Sent successfully") == node_log.count("Received successfully") == 1
        assert not marker.exists() and not (home / "apps" / "installed" / offered).exists()
        failures = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
        assert any(f"app bundle {offered} is not approved" in row.get("error", "")
                   for row in failures)
        listing = cli("apps", "--home", str(home)).stdout
        assert re.search(f"{offered} .* runs 1  messages 1  NOT APPROVED", listing)

        assert cli("approve", offered, "--home", str(home)).returncode == 0
        summary = submit_and_follow(settings, conn, project_dir=project, flwr_home=flwr_home)
    assert summary["rounds"] == 1
    assert marker.read_text() == "the bundle's code ran"
    assert hospital.poll() is None
    check_audit_and_tampering(home, tmp_path)
