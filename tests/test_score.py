"""server.score on any test set: a test-only npz, a PNG folder, an MSD folder, undefined metrics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from common.compose import compose_settings, finalize, settings_yaml
from common.data.medmnist import load_split
from common.models import build_model
from common.training import train_epochs
from server.score import main
from tests.conftest import PNEUMONIA, ROOT, needs_shared

pytestmark = needs_shared(PNEUMONIA)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pneumonia run folder: config.yaml and a CNN trained for one epoch on 600 images."""
    run = tmp_path_factory.mktemp("run")
    settings = finalize(compose_settings(["experiment=pneumonia", f"run_dir={run}",
                                          "evaluation.bootstrap=100"]), base=ROOT)
    (run / "config.yaml").write_text(settings_yaml(settings))
    x, y = load_split(PNEUMONIA, "train", settings.task)
    model = build_model(settings.task, settings.model, seed=0)
    loader = DataLoader(TensorDataset(x[:600], y[:600]), batch_size=32, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    train_epochs(model, loader, torch.optim.Adam(model.parameters(), 2e-3), task=settings.task,
                 epochs=1, device=torch.device("cpu"))
    torch.save(model.state_dict(), run / "final_model.pt")
    return run


def _test_split() -> tuple[np.ndarray, np.ndarray]:
    with np.load(PNEUMONIA) as npz:
        return npz["test_images"], npz["test_labels"].reshape(-1)


def _png_folder(folder: Path, picks: list[int]) -> Path:
    images, labels = _test_split()
    folder.mkdir()
    rows = ["image,label"]
    for i in picks:
        Image.fromarray(images[i]).save(folder / f"xray-{i}.png")
        rows.append(f"xray-{i}.png,{labels[i]}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder


def test_a_test_only_npz_is_scored_whole(run_dir: Path, tmp_path: Path) -> None:
    images, labels = _test_split()
    npz = tmp_path / "test-only.npz"
    np.savez(npz, test_images=images, test_labels=labels[:, None])
    out = tmp_path / "scores.json"
    assert main([str(run_dir), "--data", str(npz), "--out", str(out)]) == 0
    scores = json.loads(out.read_text())
    assert scores["scored"]["path"] == str(npz.resolve())
    assert scores["scored"]["num-examples"] == len(labels) == 468
    assert scores["scored"]["class-counts"] == [128, 340]
    figures = scores["test_set"]
    assert figures["num-examples"] == 468 and 0.5 < figures["auc"] <= 1.0
    assert figures["auc-ci-low"] <= figures["auc"] <= figures["auc-ci-high"]


def test_a_sixteen_image_folder_is_scored_whole_by_flag_and_by_group(
        run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, labels = _test_split()
    picks = [*np.flatnonzero(labels == 0)[:8], *np.flatnonzero(labels == 1)[:8]]
    folder = _png_folder(tmp_path / "xrays", [int(i) for i in picks])
    for args in (["--data", str(folder)], ["data=folder", f"data.path={folder}"],
                 ["data.source=folder", f"data.path={folder}"]):
        out = tmp_path / "scores.json"
        assert main([str(run_dir), *args, "--out", str(out)]) == 0, args
        scores = json.loads(out.read_text())
        assert scores["scored"]["num-examples"] == 16 and scores["scored"]["source"] == "folder"
        assert scores["scored"]["class-counts"] == [8, 8]
        assert scores["test_set"]["num-examples"] == 16
    screen = capsys.readouterr().out
    assert "16 samples" in screen and "wall time" not in screen and str(folder) in screen


def test_one_class_gives_undefined_auc_as_null_and_n_a(
        run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, labels = _test_split()
    folder = _png_folder(tmp_path / "normals", [int(i) for i in np.flatnonzero(labels == 0)[:5]])
    out = tmp_path / "scores.json"
    assert main([str(run_dir), "--data", str(folder), "--out", str(out)]) == 0
    text = out.read_text()
    assert "NaN" not in text
    figures = json.loads(text)["test_set"]
    assert figures["auc"] is None and figures["num-examples"] == 5
    assert 0.0 <= figures["accuracy"] <= 1.0
    assert "n/a" in capsys.readouterr().out


def test_bad_requests_fail_clearly(run_dir: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(run_dir), "data=nowhere", "data.path=/x"]) == 2
    assert "data=nowhere is not valid" in capsys.readouterr().err
    assert main([str(run_dir), "model=unet"]) == 2
    assert "model" in capsys.readouterr().err
    assert main([str(run_dir), "--data", str(tmp_path / "absent")]) == 2
    assert "absent" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([str(run_dir), "--data", str(tmp_path / "empty")]) == 2
    assert "labels.csv" in capsys.readouterr().err
