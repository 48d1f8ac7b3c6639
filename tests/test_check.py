"""client check and the checks at simulate start: every data problem at once, in seconds."""

from __future__ import annotations

import time
from pathlib import Path

import nibabel as nib
import numpy as np
import psutil
import pytest
from PIL import Image

from client.check import main as check_main
from simulate import main as simulate_main
from tests.conftest import PNEUMONIA, needs_shared

pytestmark = needs_shared(PNEUMONIA)


@pytest.fixture
def xrays(tmp_path: Path) -> Path:
    """60 real chest X-ray PNGs, a truncated JPEG, a missing and a non-integer label."""
    folder = tmp_path / "xrays"
    folder.mkdir()
    with np.load(PNEUMONIA) as npz:
        images, labels = npz["test_images"], npz["test_labels"].reshape(-1)
    rows = ["image,label"]
    for i in [*np.flatnonzero(labels == 0)[:30], *np.flatnonzero(labels == 1)[:30]]:
        Image.fromarray(images[i]).save(folder / f"x{i}.png")
        rows.append(f"x{i}.png,{labels[i]}")
    Image.fromarray(images[0]).save(folder / "broken.jpg")
    data = (folder / "broken.jpg").read_bytes()
    (folder / "broken.jpg").write_bytes(data[: len(data) // 2])
    Image.fromarray(images[1]).save(folder / "unlabelled.png")
    Image.fromarray(images[2]).save(folder / "worded.png")
    rows += ["broken.jpg,1", "unlabelled.png,", "worded.png,pneumonia"]
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder


@pytest.fixture
def volumes(tmp_path: Path) -> Path:
    """An MSD folder of three NIfTI head-like volumes, one with a mask of another shape."""
    folder = tmp_path / "msd"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    for name, mask_shape in (("a", (24, 24, 12)), ("b", (24, 24, 12)), ("c", (20, 24, 12))):
        image = rng.random((24, 24, 12)).astype(np.float32)
        mask = np.zeros(mask_shape, np.uint8)
        mask[6:16, 6:16, 2:10] = 1
        nib.save(nib.Nifti1Image(image, np.eye(4)), folder / "imagesTr" / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(mask, np.eye(4)), folder / "labelsTr" / f"{name}.nii.gz")
    return folder


def test_client_check_lists_all_four_problems_at_once_in_seconds(
        xrays: Path, volumes: Path, capsys: pytest.CaptureFixture[str]) -> None:
    started = time.perf_counter()
    assert check_main(["--data-path", str(xrays)]) == 2
    assert check_main(["--data-path", str(volumes),
                       "--config", "task=segmentation", "task.image_size=[32,32]"]) == 2
    assert time.perf_counter() - started < 10
    out = capsys.readouterr().out
    for kind, name in (("unreadable", "broken.jpg"), ("missing-label", "unlabelled.png"),
                       ("non-integer-label", "worded.png"), ("shape-mismatch", "c.nii.gz")):
        assert any(f"[{kind}]" in line and name in line for line in out.splitlines()), kind
    assert "samples, per class [30, 30]" in out and "test: per class" in out


def test_a_clean_folder_passes_and_a_one_class_folder_warns(
        xrays: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = (xrays / "labels.csv").read_text().splitlines()
    for name in ("broken.jpg", "unlabelled.png", "worded.png"):
        (xrays / name).unlink()
    (xrays / "labels.csv").write_text("\n".join(rows[:-3]) + "\n")
    assert check_main(["--data-path", str(xrays), "--config", "task.num_classes=2"]) == 0
    normals = [r for r in rows[:-3] if r.endswith(",0") or r.startswith("image")]
    (xrays / "labels.csv").write_text("\n".join(normals) + "\n")
    for row in rows[1:-3]:
        if row.endswith(",1"):
            (xrays / row.split(",")[0]).unlink()
    assert check_main(["--data-path", str(xrays), "--config", "task.num_classes=2"]) == 2
    out = capsys.readouterr().out
    assert "[class-absent]" in out and "class 1 has no sample" in out
    assert "[split-too-small]" in out


def test_simulate_exits_2_before_any_flower_process(xrays: Path, volumes: Path,
                                                    tmp_path: Path) -> None:
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    started = time.perf_counter()
    run = tmp_path / "run"
    code = simulate_main(["data=folder", f"data.path={xrays}", "data.split=iid",
                          "federation.num_hospitals=2", f"run_dir={run}"])
    assert code == 2 and time.perf_counter() - started < 30
    error = (run / "error.txt").read_text()
    for name in ("broken.jpg", "unlabelled.png", "worded.png"):
        assert name in error
    seg_run = tmp_path / "seg-run"
    assert simulate_main(["task=segmentation", "model=unet", "data=folder",
                          f"data.path={volumes}", "data.split=iid", "task.image_size=[32,32]",
                          "federation.num_hospitals=2", f"run_dir={seg_run}"]) == 2
    assert "c.nii.gz" in (seg_run / "error.txt").read_text()
    after = {p.pid for p in psutil.Process().children(recursive=True)}
    assert after <= before
    assert not (run / "superlink.log").exists() and not (seg_run / "superlink.log").exists()


def test_a_node_refuses_to_start_on_bad_data(xrays: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from client.__main__ import main as node_main

    before = {p.pid for p in psutil.Process().children(recursive=True)}
    code = node_main(["--data-path", str(xrays), "--insecure", "--superlink", "127.0.0.1:9",
                      "--name", "site-a", "--partition-id", "0", "--num-partitions", "1",
                      "--home", str(tmp_path / "home")])
    assert code == 2
    err = capsys.readouterr().err
    assert "the node was not started" in err and "broken.jpg" in err and "worded.png" in err
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before
    assert not (tmp_path / "home" / "node.log").exists()
