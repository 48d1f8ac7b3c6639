"""The staged app bundles into the very FAB ``flwr run`` builds from the project folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk

from server.app_stage import candidate_files, stage_app

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """This project's app files plus what a user's checkout also holds: a virtual
    environment, run folders, caches and a link, all ignored or unfit for a bundle."""
    app = tmp_path / "app"
    app.mkdir()
    for name in ("pyproject.toml", ".gitignore"):
        shutil.copyfile(ROOT / name, app / name)
    for package in ("common", "server", "client"):
        shutil.copytree(ROOT / package, app / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    (app / ".venv" / "lib").mkdir(parents=True)
    (app / ".venv" / "lib" / "site.py").write_text("x = 1\n")
    (app / "runs" / "old-run").mkdir(parents=True)
    (app / "runs" / "old-run" / "metrics.jsonl").write_text("{}\n")
    (app / "common" / "__pycache__").mkdir()
    (app / "common" / "__pycache__" / "x.py").write_text("y = 2\n")
    (app / ".git").mkdir()
    (app / ".git" / "config.toml").write_text("")
    (app / "notes.md").write_text("# notes\n")
    (app / "linked.py").symlink_to(app / "common" / "__init__.py")
    return app


def test_the_staged_bundle_is_byte_identical(project: Path, tmp_path: Path) -> None:
    staged = stage_app(project, tmp_path / "stage")
    assert build_fab_from_disk(staged) == build_fab_from_disk(project)


def test_only_candidates_outside_ignored_folders_are_staged(project: Path) -> None:
    files = candidate_files(project)
    assert "pyproject.toml" in files and "server/app.py" in files and "notes.md" in files
    assert not [f for f in files if f.startswith((".venv/", "runs/", ".git/"))
                or "__pycache__" in f or f == "linked.py"]


def test_the_stage_inside_the_project_is_not_walked(project: Path) -> None:
    stage = project / "stage"
    stage_app(project, stage)
    stage_app(project, stage)  # a second stage does not copy the first one
    assert not (stage / "stage").exists()
    assert (stage / "client" / "app.py").read_bytes() == (
        project / "client" / "app.py").read_bytes()


def test_a_folder_without_pyproject_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="pyproject.toml"):
        stage_app(tmp_path, tmp_path / "stage")
