"""Segmentation folders (MSD / nnU-Net layout): the real brain-MRI sites and small NIfTI files."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from torch.utils.data import ConcatDataset

from common.config import Settings
from common.data import DataError, load_site
from tests.test_data import BRAIN, make_settings, needs, sizes, stack

SITES = ["site-a", "site-b", "site-c"]


def _brain(**data: Any) -> Settings:
    """The brain-MRI sites as three hospitals: 64x64 axial slices through the brain."""
    return make_settings(kind="segmentation", size=(64, 64), **{
        "source": "folder", "path": str(BRAIN), "split": "natural", "spacing": [2.0, 2.0, 2.0],
        "min_foreground": 0.01, "val_fraction": 0.1, "test_fraction": 0.2, **data})


def _extents(mask: torch.Tensor) -> tuple[int, int]:
    """Rows and columns spanned by a 2D boolean mask."""
    rows, cols = mask.any(1).nonzero(), mask.any(0).nonzero()
    return int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)


@needs(BRAIN)
def test_brain_sites_natural_split_axial_slices() -> None:
    s = _brain()
    for hospital, name in enumerate(SITES):
        site = load_site(s, hospital)
        assert site.name == name
        train, val, test = sizes(site)
        assert train >= 30 and val >= 4 and test >= 8, (name, sizes(site))
        x, y = stack(ConcatDataset([site.train, site.val, site.test]))
        assert tuple(x.shape[1:]) == (1, 64, 64) and x.dtype == torch.float32
        assert tuple(y.shape[1:]) == (1, 64, 64) and y.dtype == torch.int64
        assert set(torch.unique(y).tolist()) == {0, 1}
        assert float(x.min()) >= 0 and float(x.max()) <= 1
        assert bool(((y > 0).flatten(1).float().mean(1) >= 0.01).all())
        # Axial cross-sections after reorientation to RAS: the largest brain slice is
        # longer front-to-back (columns, A) than side-to-side (rows, R). Without
        # reorienting, site-c (LSA) would give coronal slices (ratio about 1.06).
        area = (y > 0).flatten(1).sum(1)
        biggest = y[int(area.argmax()), 0] > 0
        left_right, front_back = _extents(biggest)
        assert 1.15 < front_back / left_right < 1.6, name
        assert 0.15 < float(biggest.float().mean()) < 0.6, name
        rows, cols = biggest.nonzero(as_tuple=True)
        assert abs(float(rows.float().mean()) - 31.5) < 6, name  # centred left-right


@needs(BRAIN)
def test_brain_held_out_slices_come_in_contiguous_blocks() -> None:
    """One volume per site: val/test take whole runs of 8 neighbouring slices."""
    every = _brain(min_foreground=0.0, spacing=None, val_fraction=0.0, test_fraction=0.0)
    ordered = stack(load_site(every, 0).train)[0]  # all 91 axial slices of site-a, in order
    assert len(ordered) == 91
    site = load_site(_brain(min_foreground=0.0, spacing=None), 0)
    for split in (site.val, site.test):
        held = stack(split)[0]
        index = [int((ordered - x).abs().flatten(1).sum(1).argmin()) for x in held]
        assert index == sorted(index) and len(index) >= 8
        runs = np.split(np.array(index), np.flatnonzero(np.diff(index) > 1) + 1)
        assert all(len(run) % 8 == 0 or run[-1] == 90 for run in runs), index
        assert all(run[0] % 8 == 0 for run in runs), index


def _write_case(folder: Path, name: str, seed: int, shape: tuple[int, int, int] = (24, 20, 16),
                mask_name: str | None = None) -> None:
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    mask = ((grid ** 2).sum(0) < 0.5).astype(np.uint8)
    image = 100 * mask + rng.normal(20, 5, shape)
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image.astype(np.float32), affine), folder / "imagesTr" / name)
    nib.save(nib.Nifti1Image(mask, affine), folder / "labelsTr" / (mask_name or name))


def _volumes(path: Path, size: tuple[int, ...] = (32, 32), **data: Any) -> Settings:
    return make_settings(kind="segmentation", size=size, **{
        "source": "folder", "path": str(path), "split": "iid", "val_fraction": 0.15,
        "test_fraction": 0.2, **data})


def test_many_volumes_split_by_whole_volume(tmp_path: Path) -> None:
    for case in range(8):
        _write_case(tmp_path, f"case{case}.nii.gz", case)
    site = load_site(_volumes(tmp_path), 0, data_path=str(tmp_path))
    assert sizes(site) == (5 * 16, 16, 2 * 16)  # 16 axial slices per volume; 8 volumes -> 5/1/2
    x, y = site.train[0]
    assert tuple(x.shape) == (1, 32, 32) and tuple(y.shape) == (1, 32, 32)


def test_pooled_volumes_are_shared_among_hospitals(tmp_path: Path) -> None:
    for case in range(6):
        _write_case(tmp_path, f"case{case}.nii.gz", case)
    s = _volumes(tmp_path)
    sites = [load_site(s, h) for h in range(3)]
    assert sum(sum(sizes(site)) for site in sites) == 6 * 16
    assert all(sum(sizes(site)) == 2 * 16 for site in sites)  # two whole volumes each
    with pytest.raises(DataError, match="data.split=dirichlet .* task.kind=classification"):
        load_site(_volumes(tmp_path, split="dirichlet"), 0)


@pytest.mark.parametrize("mode,size,count", [("volume", (16, 16, 16), 3),
                                             ("patches", (8, 8, 8), 3 * 3 * 3 * 2)])
def test_3d_volumes_and_patches(tmp_path: Path, mode: str, size: tuple[int, ...],
                                count: int) -> None:
    for case in range(3):
        _write_case(tmp_path, f"case{case}.nii.gz", case)
    s = _volumes(tmp_path, size=size, volume_mode=mode, val_fraction=0.0, test_fraction=0.0)
    x, y = stack(load_site(s, 0, data_path=str(tmp_path)).train)
    assert tuple(x.shape) == (count, 1, *size) and tuple(y.shape) == (count, 1, *size)
    assert y.dtype == torch.int64 and int(y.max()) == 1


def test_nnunet_channel_suffix_finds_its_mask(tmp_path: Path) -> None:
    _write_case(tmp_path, "brain_001_0000.nii.gz", 0, mask_name="brain_001.nii.gz")
    site = load_site(_volumes(tmp_path), 0, data_path=str(tmp_path))
    assert sum(sizes(site)) == 16


def test_volume_errors_name_the_files(tmp_path: Path) -> None:
    s = _volumes(tmp_path)
    (tmp_path / "imagesTr").mkdir()
    with pytest.raises(DataError, match="lacks labelsTr/"):
        load_site(s, 0, data_path=str(tmp_path))
    _write_case(tmp_path, "case0.nii.gz", 0)
    shutil.copy(tmp_path / "imagesTr" / "case0.nii.gz", tmp_path / "imagesTr" / "extra.nii.gz")
    with pytest.raises(DataError, match=r"extra.nii.gz has no mask: .*labelsTr/extra.nii.gz"):
        load_site(s, 0, data_path=str(tmp_path))
    (tmp_path / "imagesTr" / "extra.nii.gz").unlink()
    nib.save(nib.Nifti1Image(np.full((24, 20, 16), 3, np.uint8), np.eye(4)),
             tmp_path / "labelsTr" / "case0.nii.gz")
    with pytest.raises(DataError, match=r"mask .*case0.nii.gz holds class\(es\) \[3\] outside"):
        load_site(s, 0, data_path=str(tmp_path))
    with pytest.raises(DataError, match="data.volume_mode=slices does not fit task.spatial_dims=3"):
        load_site(_volumes(tmp_path, size=(8, 8, 8)), 0, data_path=str(tmp_path))
    (tmp_path / "imagesTr" / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="notes.txt: unknown volume extension '.txt'"):
        load_site(s, 0, data_path=str(tmp_path))


@needs(BRAIN)
def test_mask_of_other_shape_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "site"
    shutil.copytree(BRAIN / "site-a", folder)
    nib.save(nib.Nifti1Image(np.zeros((10, 10, 10), np.uint8), np.eye(4)),
             folder / "labelsTr" / "mni152.nii.gz")
    with pytest.raises(DataError, match=r"mask .*labelsTr/mni152.nii.gz has shape \(10, 10, 10\) "
                                        r"but its image .*imagesTr/mni152.nii.gz has shape "
                                        r"\(91, 109, 91\)"):
        load_site(_brain(), 0, data_path=str(folder))


@needs(BRAIN)
def test_corrupt_volume_is_named(tmp_path: Path) -> None:
    folder = tmp_path / "site"
    shutil.copytree(BRAIN / "site-a", folder)
    (folder / "imagesTr" / "mni152.nii.gz").write_bytes(b"garbage")
    with pytest.raises(DataError, match="cannot read image .*imagesTr/mni152.nii.gz"):
        load_site(_brain(), 0, data_path=str(folder))


@needs(BRAIN)
def test_natural_split_needs_one_folder_per_hospital() -> None:
    s = _brain()
    s.federation.num_hospitals = 4
    with pytest.raises(DataError, match="holds 3 hospital folders but federation.num_hospitals=4"):
        load_site(s, 0)
