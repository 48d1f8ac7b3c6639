"""client predict and the exported model, on real files (pneumoniamnist PNG/JPEG, pydicom's
DICOM files, the brain MRI NIfTI volumes), with models trained briefly here."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file
from torch.utils.data import DataLoader, TensorDataset

from client.predict import main
from common.config import Settings, settings_from_dict
from common.data import load_site
from common.data.medmnist import load_split
from common.export import ExportError, export_model, load_export
from common.models import build_model
from common.training import make_optimizer, train_epochs
from tests.conftest import BRAIN, PNEUMONIA, needs_shared


def _train(settings: Settings, x: torch.Tensor, y: torch.Tensor, epochs: int) -> dict:
    model = build_model(settings.task, settings.model, seed=0)
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    train_epochs(model, loader, make_optimizer(model, settings.train), task=settings.task,
                 epochs=epochs, device=torch.device("cpu"))
    return model.state_dict()


@pytest.fixture(scope="module")
def pneumonia(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder with a cnn trained one epoch on 600 pneumoniamnist images."""
    settings = settings_from_dict({"data": {"source": "medmnist", "path": str(PNEUMONIA)},
                                   "model": {"channels": [8, 16]}})
    x, y = load_split(PNEUMONIA, "train", settings.task)
    run = tmp_path_factory.mktemp("pneumonia-run")
    export_model(run, settings, _train(settings, x[:600], y[:600], 1),
                 threshold={"value": 0.4, "method": "youden", "chosen_on": "test"},
                 weights_from="final_model.pt")
    return run


@needs_shared(PNEUMONIA)
def test_classification_on_png_jpeg_and_dicom(pneumonia: Path, tmp_path: Path) -> None:
    with np.load(PNEUMONIA) as npz:
        images = npz["test_images"][:2]
    Image.fromarray(images[0]).save(tmp_path / "a.png")
    Image.fromarray(images[1]).save(tmp_path / "b.jpg", quality=95)
    series = Path(get_testdata_file("dicomdirtests/77654033/CT2/17136"))
    inputs = [tmp_path / "a.png", tmp_path / "b.jpg", Path(get_testdata_file("CT_small.dcm")),
              Path(get_testdata_file("MR_small.dcm")), series.parent]
    out = tmp_path / "out"
    assert main([str(pneumonia), *map(str, inputs), "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "predictions.csv").read_text().splitlines()))
    assert [r["file"] for r in rows] == list(map(str, inputs))
    for row in rows:
        p0, p1 = float(row["p_class-0"]), float(row["p_class-1"])
        assert abs(p0 + p1 - 1) < 1e-4
        assert int(row["label"]) == int(p1 >= 0.4) and float(row["threshold"]) == 0.4
    exported = load_export(pneumonia / "model")
    assert exported.threshold == 0.4 and not exported.model.training
    assert exported.metadata["preprocessing"]["image_size"] == [28, 28]


@needs_shared(PNEUMONIA)
def test_bad_inputs_exit_2(pneumonia: Path, tmp_path: Path) -> None:
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    assert main([str(pneumonia), str(tmp_path / "broken.png"), "--out", str(tmp_path)]) == 2
    assert main([str(tmp_path), str(tmp_path / "broken.png"), "--out", str(tmp_path)]) == 2
    (pneumonia / "model" / "models" / "model.pt").rename(tmp_path / "keep.pt")
    try:
        with pytest.raises(ExportError, match="model.pt"):
            load_export(pneumonia)
    finally:
        (tmp_path / "keep.pt").rename(pneumonia / "model" / "models" / "model.pt")


@needs_shared(BRAIN)
def test_segmentation_mask_on_input_grid_with_dice(tmp_path: Path) -> None:
    settings = settings_from_dict({
        "task": {"kind": "segmentation", "image_size": [64, 64]},
        "model": {"name": "unet", "channels": [8, 16, 32]}, "train": {"lr": 0.003},
        "data": {"source": "folder", "path": str(BRAIN), "split": "natural",
                 "spacing": [3.0, 3.0, 3.0], "min_foreground": 0.01, "test_fraction": 0.0,
                 "val_fraction": 0.0}, "federation": {"num_hospitals": 3}})
    train = load_site(settings, 0).train  # site-a slices; predicted on site-b
    x = torch.stack([s[0] for s in train])
    y = torch.stack([s[1] for s in train])
    export_model(tmp_path, settings, _train(settings, x, y, 8), threshold=None,
                 weights_from="final_model.pt")
    image = BRAIN / "site-b" / "imagesTr" / "colin27.nii.gz"
    out = tmp_path / "out"
    assert main([str(tmp_path / "model"), str(image), "--out", str(out)]) == 0
    source, mask = nib.load(str(image)), nib.load(str(out / "colin27_mask.nii.gz"))
    assert mask.shape == source.shape and np.array_equal(mask.affine, source.affine)
    row = next(csv.DictReader((out / "predictions.csv").read_text().splitlines()))
    assert row["label_file"].endswith("labelsTr/colin27.nii.gz")
    assert 0.5 < float(row["dice"]) <= 1.0
