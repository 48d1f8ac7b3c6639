"""Grad-CAM explanations: known discriminative regions, every classifier, the real commands."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from common.config import ModelConfig, TaskConfig, TrainConfig
from common.explain import Explainer, ExplainError, content_box, peak_of, target_layer
from common.explain_output import write_explanations
from common.models import build_model
from common.overlay import explanation_png
from common.training import make_optimizer, train_epochs
from tests.conftest import PNEUMONIA, ROOT, needs_shared

PAD = 4  # zero columns (2D) / slabs (3D) on each side, as the readers pad to an aspect ratio


def _squares(n: int, size: int, square: tuple[slice, ...], seed: int) -> tuple[torch.Tensor,
                                                                             torch.Tensor]:
    """``n`` noisy images ``[n, 1, size...]`` zero-padded along axis 0 by PAD on each side;
    class 1 has a bright block at ``square``, class 0 has none."""
    gen = torch.Generator().manual_seed(seed)
    dims = len(square)
    x = 0.2 + 0.3 * torch.rand(n, 1, *([size] * dims), generator=gen)
    y = torch.arange(n) % 2
    for i in torch.nonzero(y).flatten().tolist():
        x[(i, 0, *square)] += 0.5
    x[:, :, :PAD], x[:, :, size - PAD:] = 0.0, 0.0
    return x, y


def _trained(task: TaskConfig, model: ModelConfig, x: torch.Tensor, y: torch.Tensor,
             epochs: int) -> torch.nn.Module:
    torch.manual_seed(0)
    net = build_model(task, model, seed=0)
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    train_epochs(net, loader, make_optimizer(net, TrainConfig(lr=3e-3)), task=task,
                 epochs=epochs, device=torch.device("cpu"))
    return net.eval()


def _inside(peak: tuple[int, ...], square: tuple[slice, ...]) -> bool:
    return all(s.start <= p < s.stop for p, s in zip(peak, square, strict=True))


def _check_known_region(task: TaskConfig, model: ModelConfig, square: tuple[slice, ...],
                        n: int, epochs: int, methods: tuple[str, ...]) -> None:
    size = task.image_size[0]
    x, y = _squares(n, size, square, seed=1)
    net = _trained(task, model, x, y, epochs)
    tx, ty = _squares(16, size, square, seed=2)
    with torch.no_grad():
        accuracy = float((net(tx).argmax(1) == ty).float().mean())
    assert accuracy >= 0.9, f"the model did not learn the square (accuracy {accuracy})"
    for method in methods:
        results = Explainer(net, method=method, model_name=model.name).explain(tx[ty == 1], 1)
        for result in results:
            assert result.box[0] == (PAD, size - PAD)  # the padding is known to be padding
            assert result.heatmap.shape == tuple(task.image_size)
            assert float(result.heatmap[:PAD].max()) == 0.0  # nothing on the padding
            assert _inside(result.peak, square), (method, result.peak, square)
            assert PAD < result.peak[0] < size - PAD - 1


def test_gradcam_peak_in_known_square_2d() -> None:
    # ResNet: global average pooling before its head, as Grad-CAM assumes; layer4 is 4x4
    square = (slice(12, 20), slice(16, 24))
    task = TaskConfig(image_size=[32, 32])
    _check_known_region(task, ModelConfig(name="resnet18", channels=[8]), square, 128, 6,
                        ("gradcampp",))


def test_gradcam_peak_in_known_block_3d() -> None:
    square = (slice(6, 12), slice(4, 10), slice(8, 14))
    task = TaskConfig(spatial_dims=3, image_size=[16, 16, 16])
    _check_known_region(task, ModelConfig(name="cnn", channels=[4, 8]), square, 64, 6,
                        ("gradcam",))


@pytest.mark.parametrize("name", ["cnn", "densenet121", "resnet18", "resnet34"])
@pytest.mark.parametrize("dims", [2, 3])
def test_every_classifier_has_a_target_layer(name: str, dims: int) -> None:
    size = [32] * dims
    net = build_model(TaskConfig(spatial_dims=dims, image_size=size),
                      ModelConfig(name=name, channels=[8, 16, 32]))
    layer = target_layer(net, name)
    assert layer == {"cnn": "net.layer_2", "densenet121": "class_layers.relu"}.get(name, "layer4")
    assert target_layer(net) == layer  # the structure alone finds it too
    (result,) = Explainer(net, model_name=name).explain(torch.rand(1, 1, *size))
    assert result.heatmap.shape == tuple(size) and result.heatmap.min() >= 0
    assert result.probs.shape == (2,) and abs(float(result.probs.sum()) - 1) < 1e-5


def test_no_convolution_is_a_clear_error() -> None:
    with pytest.raises(ExplainError, match="no convolutional layer"):
        target_layer(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2)))
    net = build_model(TaskConfig(image_size=[16, 16]), ModelConfig(channels=[4, 8]))
    with pytest.raises(ExplainError, match="unknown method"):
        Explainer(net, method="saliency")
    with pytest.raises(ExplainError, match="outside the model's 2 classes"):
        Explainer(net).explain(torch.rand(1, 1, 16, 16), class_idx=5)


def test_peak_avoids_the_upsampled_border_plateau() -> None:
    heat = np.zeros((16, 16), dtype=np.float32)
    heat[:, :2] = 1.0  # linear upsampling copies the edge cell out to the border
    heat[:, 2] = 0.9
    assert peak_of(heat, ((0, 16), (0, 16)), (4.0, 4.0))[1] == 2
    image = torch.zeros(1, 10, 12)
    image[0, 2:7, 3:12] = torch.rand(5, 9) + 0.1
    assert content_box(image) == ((2, 7), (3, 12))


def test_overlay_pngs_and_csv(tmp_path: Path) -> None:
    net = build_model(TaskConfig(spatial_dims=3, image_size=[16, 16, 16]),
                      ModelConfig(channels=[4, 8]))
    images = torch.rand(3, 1, 16, 16, 16)
    csv_path = write_explanations(Explainer(net, model_name="cnn"), images, [0, 1, None],
                                  ["a.nii.gz", "b.nii.gz", "c"], tmp_path / "out")
    rows = list(csv.DictReader(csv_path.open()))
    assert [r["sample"] for r in rows] == ["a.nii.gz", "b.nii.gz", "c"]
    assert rows[2]["true_label"] == "" and {"peak_0", "peak_1", "peak_2"} <= set(rows[0])
    for row in rows:
        assert abs(float(row["prob_0"]) + float(row["prob_1"]) - 1) < 1e-4
        with Image.open(tmp_path / "out" / row["png"]) as png:
            assert png.format == "PNG" and png.width > 2 * png.height > 0  # a 3-panel montage
    picture = explanation_png(np.random.rand(1, 20, 30), np.random.rand(20, 30), (3, 4))
    assert picture.width == 30 * 12 and picture.height == 20 * 12


@needs_shared(PNEUMONIA)
def test_client_explain_on_pneumoniamnist(tmp_path: Path) -> None:
    from client.__main__ import main as client_main
    from common.compose import compose_settings, finalize
    from common.data.medmnist import load_split
    from common.export import export_model
    from server.explain import main as server_explain

    settings = finalize(compose_settings(["data.source=medmnist", f"data.path={PNEUMONIA}",
                                          "model.channels=[8,16]",
                                          f"run_dir={tmp_path / 'run'}"]), base=ROOT)
    x, y = load_split(PNEUMONIA, "train", settings.task)
    net = _trained(settings.task, settings.model, x[:512], y[:512], 2)
    export_model(tmp_path / "run", settings, net.state_dict(), threshold=None,
                 weights_from="best_model.pt")
    out = tmp_path / "explain"
    code = client_main(["explain", "--model", str(tmp_path / "run"), "--data-path",
                        str(PNEUMONIA), "--out", str(out), "--limit", "6",
                        "--method", "gradcampp"])
    assert code == 0
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert len(rows) == 6 and rows[0]["sample"] == "test:0"
    for row in rows:
        assert row["true_label"] in ("0", "1") and row["predicted"] in ("0", "1")
        assert 0 <= int(row["peak_0"]) < 28 and 0 <= int(row["peak_1"]) < 28
        with Image.open(out / row["png"]) as png:
            assert png.size == (28 * 8, 28 * 8)
    assert server_explain([str(tmp_path / "run"), "--limit", "3"]) == 0
    assert len(list((tmp_path / "run" / "explain").glob("*.png"))) == 3
    assert client_main(["explain", "--model", str(tmp_path / "nothing"), "--data-path",
                        str(PNEUMONIA), "--out", str(out)]) == 2


@needs_shared(PNEUMONIA)
def test_client_explain_on_a_hospital_folder_of_pngs(tmp_path: Path) -> None:
    from client.__main__ import main as client_main
    from common.compose import compose_settings, finalize
    from common.export import export_model

    with np.load(PNEUMONIA) as npz:
        images, labels = npz["test_images"][:20], npz["test_labels"][:20, 0]
    folder = tmp_path / "site"
    folder.mkdir()
    lines = ["image,label"]
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        Image.fromarray(image).save(folder / f"xray{i}.png")
        lines.append(f"xray{i}.png,{int(label)}")
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")
    settings = finalize(compose_settings(["data.source=medmnist", f"data.path={PNEUMONIA}",
                                          "model.channels=[8,16]",
                                          f"run_dir={tmp_path / 'run'}"]), base=ROOT)
    net = build_model(settings.task, settings.model, seed=0)
    export_model(tmp_path / "run", settings, net.state_dict(), threshold=None,
                 weights_from="final_model.pt")
    for split, expected in (("test", 4), ("all", 20)):
        out = tmp_path / f"out-{split}"
        assert client_main(["explain", "--model", str(tmp_path / "run" / "model"),
                            "--data-path", str(folder), "--out", str(out),
                            "--split", split, "--class", "1"]) == 0
        rows = list(csv.DictReader((out / "predictions.csv").open()))
        assert len(rows) == expected and all(r["explained_class"] == "1" for r in rows)
        for row in rows:  # each row names its file and carries that file's label
            number = int(row["sample"].removeprefix("xray").removesuffix(".png"))
            assert int(row["true_label"]) == int(labels[number])
            assert (out / row["png"]).is_file()
    single = tmp_path / "single"
    assert client_main(["explain", "--model", str(tmp_path / "run"), "--data-path",
                        str(folder / "xray3.png"), "--out", str(single)]) == 0
    (row,) = csv.DictReader((single / "predictions.csv").open())
    assert row["sample"] == "xray3.png" and row["true_label"] == ""
