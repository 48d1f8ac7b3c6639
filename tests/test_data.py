"""Data readers on real files: MedMNIST, PNG/DICOM/NIfTI folders, brain MRI volumes."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom.data
import pytest
import torch
from PIL import Image

from common.compose import compose_settings, finalize
from common.config import Settings
from common.data import DataError, load_central_test, load_pooled, load_site
from common.data.partition import dirichlet_partition, iid_partition, three_way
from tests.conftest import BRAIN, PNEUMONIA, ROOT, needs_shared


def _settings(*overrides: str) -> Settings:
    return finalize(compose_settings(list(overrides)), base=ROOT)


def _stack(dataset) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[no-untyped-def]
    items = [dataset[i] for i in range(len(dataset))]
    return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])


# --- synthetic -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,model,size", [
    ("classification", "cnn", [28, 28]), ("classification", "cnn", [16, 16, 16]),
    ("segmentation", "unet", [32, 32]), ("segmentation", "unet", [16, 16, 16]),
])
def test_synthetic_shapes_and_types(kind: str, model: str, size: list[int]) -> None:
    s = _settings(f"task={kind}", f"model={model}", f"task.spatial_dims={len(size)}",
                  f"task.image_size={size}", "data.samples_per_hospital=40")
    site = load_site(s, 1)
    x, y = site.train[0]
    assert x.dtype == torch.float32 and tuple(x.shape) == (1, *size)
    assert y.dtype == torch.int64
    assert tuple(y.shape) == (() if kind == "classification" else (1, *size))
    assert len(site.train) + len(site.val) + len(site.test) == 40


def test_synthetic_is_deterministic_and_differs_per_hospital() -> None:
    s = _settings("data.samples_per_hospital=32")
    a, b = _stack(load_site(s, 0).train), _stack(load_site(s, 0).train)
    c = _stack(load_site(s, 1).train)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0][:5], c[0][:5])
    assert load_central_test(s) is not None


# --- partitions ------------------------------------------------------------------------------

def test_dirichlet_covers_every_sample_once_with_skew() -> None:
    labels = np.repeat([0, 1], 500)
    parts = dirichlet_partition(labels, 3, 0.3, np.random.default_rng(0))
    joined = np.concatenate(parts)
    assert sorted(joined.tolist()) == list(range(1000))
    shares = [labels[p].mean() for p in parts]
    assert max(shares) - min(shares) > 0.2
    iid = iid_partition(1000, 3, np.random.default_rng(0))
    assert sorted(np.concatenate(iid).tolist()) == list(range(1000))


def test_impossible_dirichlet_split_is_refused() -> None:
    with pytest.raises(DataError, match="dirichlet_alpha"):
        dirichlet_partition(np.zeros(4, int), 3, 0.01, np.random.default_rng(0), min_size=2)


def test_slice_blocks_stay_together() -> None:
    train, val, test = three_way(40, 0.1, 0.2, np.random.default_rng(0), block=4)
    assert sorted(np.concatenate([train, val, test]).tolist()) == list(range(40))
    for split in (val, test):
        assert all(i // 4 * 4 in split for i in split)  # whole blocks only


# --- MedMNIST --------------------------------------------------------------------------------

@needs_shared(PNEUMONIA)
def test_pneumoniamnist_hospitals_and_central_test() -> None:
    s = _settings("experiment=pneumonia")
    sites = [load_site(s, h) for h in range(3)]
    assert sum(len(site.train) + len(site.test) for site in sites) == 4214
    assert sum(len(site.val) for site in sites) == 524
    central = load_central_test(s)
    assert central is not None and len(central) == 468
    x, y = central[0]
    assert tuple(x.shape) == (1, 28, 28) and float(x.min()) >= 0 and float(x.max()) <= 1
    pneumonia_share = [float(_stack(site.train)[1].float().mean()) for site in sites]
    assert max(pneumonia_share) - min(pneumonia_share) > 0.1  # label skew
    assert len(load_pooled(s).train) == sum(len(site.train) for site in sites)


# --- folders of PNG / DICOM / NIfTI ----------------------------------------------------------

def _write_pngs(folder: Path, count: int) -> list[str]:
    rng = np.random.default_rng(0)
    names = []
    for i in range(count):
        name = f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (40, 30), dtype=np.uint8)).save(folder / name)
        names.append(name)
    return names


def _classification_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "xray"
    folder.mkdir()
    rows = [f"{name},{i % 2}" for i, name in enumerate(_write_pngs(folder, 8))]
    shutil.copy(pydicom.data.get_testdata_file("CT_small.dcm"), folder / "ct.dcm")
    shutil.copy(pydicom.data.get_testdata_file("MR_small.dcm"), folder / "mr.dcm")
    shutil.copy(Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii", folder / "t1.nii")
    rows += ["ct.dcm,1", "mr.dcm,0", "t1.nii,1"]
    (folder / "labels.csv").write_text("image,label\n" + "\n".join(rows) + "\n")
    return folder


def _folder_settings(folder: Path) -> Settings:
    return _settings("data=folder", f"data.path={folder}", "data.split=iid",
                     "task.image_size=[32,32]", "data.val_fraction=0.1", "data.test_fraction=0.2")


def test_folder_reads_png_dicom_and_nifti(tmp_path: Path) -> None:
    folder = _classification_folder(tmp_path)
    s = _folder_settings(folder)
    site = load_site(s, 0, data_path=str(folder))
    x, y = _stack(site.train)
    assert len(site.train) + len(site.val) + len(site.test) == 11
    assert tuple(x.shape[1:]) == (1, 32, 32) and x.dtype == torch.float32
    assert float(x.min()) >= 0 and float(x.max()) <= 1
    parts = [load_site(s, h) for h in range(3)]
    assert sum(len(p.train) + len(p.val) + len(p.test) for p in parts) == 11


@pytest.mark.parametrize("breakage,message", [
    (lambda f: (f / "labels.csv").unlink(), "labels.csv not found"),
    (lambda f: _write_pngs(f, 9), "img8.png has no label"),
    (lambda f: (f / "ct.dcm").unlink(), "ct.dcm is listed"),
    (lambda f: (f / "labels.csv").write_text("image,label\nimg0.png,\n"), "img0.png' has no label"),
    (lambda f: (f / "img3.png").write_bytes(b"not a png at all"), "cannot read image .*img3.png"),
    (lambda f: (f / "t1.nii").write_bytes(b"\x00" * 40), "cannot read image .*t1.nii"),
    (lambda f: (f / "labels.csv").write_text("file,class\nimg0.png,1\n"), "needs the columns"),
])
def test_folder_errors_name_the_file(tmp_path: Path, breakage, message: str) -> None:  # type: ignore[no-untyped-def]
    folder = _classification_folder(tmp_path)
    breakage(folder)
    with pytest.raises(DataError, match=message):
        load_site(_folder_settings(folder), 0, data_path=str(folder))


def test_missing_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nowhere not found"):
        load_site(_folder_settings(tmp_path / "nowhere"), 0, data_path=str(tmp_path / "nowhere"))


# --- brain MRI volumes -----------------------------------------------------------------------

@needs_shared(BRAIN)
def test_brain_sites_natural_split_axial_slices() -> None:
    s = _settings("experiment=brain_mri")
    for hospital, name in enumerate(["site-a", "site-b", "site-c"]):
        site = load_site(s, hospital)
        assert site.name == name
        x, y = _stack(site.train)
        assert tuple(x.shape[1:]) == (1, 64, 64) and tuple(y.shape[1:]) == (1, 64, 64)
        assert set(torch.unique(y).tolist()) <= {0, 1}
        assert len(site.test) > 0
        # RAS axial slices: the brain sits mid-slice, left-right symmetric, not touching edges
        brain = (y > 0).float().mean(0)[0]
        rows, cols = torch.nonzero(brain > 0.5, as_tuple=True)
        assert 0.3 < float(brain.mean()) < 0.7 or len(rows) > 50
        assert abs(float(rows.float().mean()) - 31.5) < 8, name


def _segmentation_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "site"
    shutil.copytree(BRAIN / "site-a", folder)
    return folder


@needs_shared(BRAIN)
def test_mask_of_other_shape_is_refused(tmp_path: Path) -> None:
    folder = _segmentation_folder(tmp_path)
    mask = folder / "labelsTr" / "mni152.nii.gz"
    small = nib.Nifti1Image(np.zeros((10, 10, 10), np.uint8), np.eye(4))
    nib.save(small, mask)
    s = _settings("experiment=brain_mri")
    with pytest.raises(DataError, match=r"mask .*mni152.nii.gz has shape \(10, 10, 10\) but its "
                                        r"image .* has shape \(91, 109, 91\)"):
        load_site(s, 0, data_path=str(folder))


@needs_shared(BRAIN)
def test_image_without_mask_and_corrupt_volume_are_named(tmp_path: Path) -> None:
    folder = _segmentation_folder(tmp_path)
    s = _settings("experiment=brain_mri")
    shutil.copy(folder / "imagesTr" / "mni152.nii.gz", folder / "imagesTr" / "extra.nii.gz")
    with pytest.raises(DataError, match="extra.nii.gz has no mask"):
        load_site(s, 0, data_path=str(folder))
    (folder / "imagesTr" / "extra.nii.gz").unlink()
    (folder / "imagesTr" / "mni152.nii.gz").write_bytes(b"garbage")
    with pytest.raises(DataError, match="cannot read .*mni152.nii.gz"):
        load_site(s, 0, data_path=str(folder))


@needs_shared(BRAIN)
def test_natural_split_needs_one_folder_per_hospital() -> None:
    s = _settings("experiment=brain_mri", "federation.num_hospitals=4", "federation.min_train=3")
    with pytest.raises(DataError, match="holds 3 hospital folders but federation.num_hospitals=4"):
        load_site(s, 0)
