"""Folder classification on real files: PNG (PneumoniaMNIST), DICOM (pydicom), NIfTI (nibabel)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom.data
import pytest
import torch
from PIL import Image

from common.config import Settings
from common.data import DataError, load_central_test, load_site
from tests.test_data import PNEUMONIA, count, make_settings, needs, sizes, stack

PNG_COUNT = 12


def _write_pngs(folder: Path, start: int, count: int) -> list[tuple[str, int]]:
    """Real chest X-rays from the PneumoniaMNIST file as PNGs: ``(name, label)`` rows."""
    with np.load(PNEUMONIA) as npz:
        images, labels = npz["train_images"], npz["train_labels"][:, 0]
    rows = []
    for i in range(start, start + count):
        Image.fromarray(images[i]).save(folder / f"xray{i}.png")
        rows.append((f"xray{i}.png", int(labels[i])))
    return rows


def _classification_folder(root: Path, name: str = "xray") -> Path:
    folder = root / name
    (folder / "dicom").mkdir(parents=True)
    rows = _write_pngs(folder, 0, PNG_COUNT)
    for name, target in (("CT_small.dcm", "ct.dcm"), ("MR_small.dcm", "mr.dcm")):
        shutil.copy(str(pydicom.data.get_testdata_file(name)), folder / "dicom" / target)
    shutil.copy(Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii", folder / "t1.nii")
    rows += [("dicom/ct.dcm", 1), ("dicom/mr.dcm", 0), ("t1.nii", 1)]
    _write_csv(folder, rows)
    return folder


def _write_csv(folder: Path, rows: list[tuple[str, int]]) -> None:
    text = "image,label\n" + "".join(f"{name},{label}\n" for name, label in rows)
    (folder / "labels.csv").write_text(text)


def _settings(path: Path, **data: Any) -> Settings:
    return make_settings(**{"source": "folder", "path": str(path), "split": "iid",
                            "val_fraction": 0.1, "test_fraction": 0.2, **data})


@needs(PNEUMONIA)
def test_folder_reads_png_dicom_and_nifti(tmp_path: Path) -> None:
    folder = _classification_folder(tmp_path)
    s = _settings(folder)
    site = load_site(s, 0, data_path=str(folder))
    assert site.name == "xray" and sum(sizes(site)) == PNG_COUNT + 3
    x, y = stack(site.train)
    assert tuple(x.shape[1:]) == (1, 28, 28) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and y.ndim == 1
    assert float(x.min()) >= 0 and float(x.max()) <= 1
    assert load_central_test(s) is None


@needs(PNEUMONIA)
def test_png_pixels_keep_their_orientation(tmp_path: Path) -> None:
    """A PNG reads as the same (rows, columns) array as the MedMNIST file it came from."""
    folder = tmp_path / "png"
    folder.mkdir()
    _write_csv(folder, _write_pngs(folder, 0, 6))
    s = _settings(folder, val_fraction=0.0, test_fraction=0.0)
    x, _ = stack(load_site(s, 0, data_path=str(folder)).train)
    with np.load(PNEUMONIA) as npz:
        raw = torch.from_numpy(npz["train_images"][:6].astype(np.float32))
    low, high = raw.amin((1, 2), keepdim=True), raw.amax((1, 2), keepdim=True)
    assert torch.allclose(x[:, 0], (raw - low) / (high - low), atol=1e-5)


@needs(PNEUMONIA)
@pytest.mark.parametrize("split", ["iid", "dirichlet"])
def test_pooled_folder_is_partitioned_among_hospitals(tmp_path: Path, split: str) -> None:
    folder = _classification_folder(tmp_path)
    s = _settings(folder, split=split, dirichlet_alpha=5.0, val_fraction=0.0, test_fraction=0.0)
    s.task.image_size = [40, 40]
    sites = [load_site(s, h) for h in range(3)]
    assert [site.name for site in sites] == ["hospital-0", "hospital-1", "hospital-2"]
    assert sum(count(site.train) for site in sites) == PNG_COUNT + 3
    assert all(count(site.train) > 0 for site in sites)
    assert tuple(sites[0].train[0][0].shape) == (1, 40, 40)


@needs(PNEUMONIA)
def test_natural_split_uses_one_folder_per_hospital(tmp_path: Path) -> None:
    for name in ("b-clinic", "a-hospital"):
        _classification_folder(tmp_path, name)
    s = _settings(tmp_path, split="natural")
    s.federation.num_hospitals = 2
    assert [load_site(s, h).name for h in range(2)] == ["a-hospital", "b-clinic"]
    s.federation.num_hospitals = 3
    with pytest.raises(DataError, match="holds 2 hospital folders but federation.num_hospitals=3"):
        load_site(s, 0)


def _append_row(folder: Path, row: str) -> None:
    with open(folder / "labels.csv", "a") as handle:
        handle.write(row + "\n")


def _append_file(folder: Path, name: str) -> None:
    (folder / name).write_bytes(b"BM")
    _append_row(folder, f"{name},0")


BREAKAGES: list[tuple[Callable[[Path], object], str]] = [
    (lambda f: (f / "labels.csv").unlink(), r"labels.csv not found \(data.labels_csv"),
    (lambda f: shutil.copy(f / "xray0.png", f / "stray.png"), "stray.png has no label: it is "
                                                              "missing from .*labels.csv"),
    (lambda f: (f / "dicom" / "ct.dcm").unlink(), "ct.dcm is listed in .*labels.csv but does "
                                                  "not exist"),
    (lambda f: _append_row(f, "xray0.png,"), "labels.csv line 17: image 'xray0.png' has no label"),
    (lambda f: _append_row(f, "xray0.png,pneumonia"), "label 'pneumonia' of 'xray0.png' is not "
                                                      "an integer"),
    (lambda f: _append_row(f, "xray0.png,7"), "xray0.png: label 7 outside"),
    (lambda f: (f / "xray3.png").write_bytes(b"not a png at all"), "cannot read image .*xray3.png"),
    (lambda f: (f / "dicom" / "mr.dcm").write_bytes(b"\x00" * 300), "cannot read image .*mr.dcm"),
    (lambda f: (f / "t1.nii").write_bytes(b"\x00" * 40), "cannot read image .*t1.nii"),
    (lambda f: (f / "labels.csv").write_text("file,class\nxray0.png,1\n"), "needs the columns "
                                                                           "'image' and 'label'"),
    (lambda f: _append_file(f, "scan.bmp"), r"scan.bmp: unknown image extension '.bmp'"),
]


@needs(PNEUMONIA)
@pytest.mark.parametrize("breakage,message", BREAKAGES)
def test_folder_errors_name_the_file(tmp_path: Path, breakage: Callable[[Path], object],
                                     message: str) -> None:
    folder = _classification_folder(tmp_path)
    breakage(folder)
    with pytest.raises(DataError, match=message):
        load_site(_settings(folder), 0, data_path=str(folder))


@needs(PNEUMONIA)
def test_corrupt_nifti_gz_is_named(tmp_path: Path) -> None:
    folder = _classification_folder(tmp_path)
    (folder / "broken.nii.gz").write_bytes(b"garbage, not gzip")
    _append_row(folder, "broken.nii.gz,0")
    with pytest.raises(DataError, match="cannot read image .*broken.nii.gz"):
        load_site(_settings(folder), 0, data_path=str(folder))


def test_missing_folder_is_named(tmp_path: Path) -> None:
    nowhere = tmp_path / "nowhere"
    with pytest.raises(DataError, match="nowhere not found"):
        load_site(_settings(nowhere), 0, data_path=str(nowhere))
    with pytest.raises(DataError, match="data.path: folder .*nowhere not found"):
        load_site(_settings(nowhere, split="natural"), 0)
