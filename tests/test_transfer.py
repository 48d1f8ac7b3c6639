"""Transfer learning: real MONAI nets' saved weights into other nets; freezing in real rounds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from client.hospital import Hospital
from client.local import train_round
from common.config import ConfigError, ModelConfig, TaskConfig
from common.models import build_model
from common.transfer import (
    TransferError,
    freeze,
    init_from_file,
    load_matching,
    matching_parameters,
    read_state_dict,
)
from server.checkpoint import Checkpoint, save_checkpoint
from server.initial_model import TRANSFER_FILE, initial_model
from tests.conftest import small_settings

TASK = TaskConfig()  # 2 classes, 1 channel, 28 x 28


def _cnn(seed: int, *, classes: int = 2, channels: list[int] | None = None) -> torch.nn.Module:
    task = TaskConfig(num_classes=classes)
    return build_model(task, ModelConfig(channels=channels or [16, 32, 64]), seed=seed)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.equal(a.float(), b.float()))


def test_other_head_loads_the_body_and_reports_the_head(tmp_path: Path) -> None:
    """A 3-class CNN's saved weights into a 2-class CNN: all but the last layer load."""
    source = _cnn(1, classes=3)
    path = tmp_path / "three_class.pt"
    torch.save(source.state_dict(), path)
    target = _cnn(2)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    report = init_from_file(target, path)
    after = target.state_dict()
    assert report.shape_mismatch, "the 3-class head must be reported"
    mismatched = {name for name, _, _ in report.shape_mismatch}
    for name, file_shape, model_shape in report.shape_mismatch:
        assert file_shape != model_shape and _same(after[name], before[name])
    for name in report.loaded:
        assert _same(after[name], source.state_dict()[name])
    assert set(report.loaded) | mismatched == set(after)
    assert not report.missing_in_file and not report.unexpected_in_file
    summary = report.to_json()
    assert summary["loaded"] == len(report.loaded) and summary["shape_mismatch"] == len(mismatched)
    assert "shape differs" in report.line() and str(path) in report.line()


def test_narrower_cnn_and_wrapped_checkpoints(tmp_path: Path) -> None:
    """Different channels: only equal-shaped tensors load; prefixes and dict wrappers are found."""
    narrow = _cnn(3, channels=[8, 32, 64]).state_dict()
    target = _cnn(4)
    report = load_matching(target, narrow, "narrow")
    # the first block is narrower (and the second's input): those differ, the rest load
    assert {n.split(".")[1] for n, _, _ in report.shape_mismatch} == {"layer_0", "layer_1"}
    assert {"final.1.weight", "net.layer_2.conv.unit0.conv.weight"} <= set(report.loaded)
    assert _same(target.state_dict()["final.1.weight"], narrow["final.1.weight"])
    full = _cnn(5).state_dict()
    for wrapped in ({"state_dict": {f"module.{k}": v for k, v in full.items()}, "epoch": 3},
                    {"model": full, "optimizer": {"lr": 0.1}},
                    {f"_module.{k}": v.double() for k, v in full.items()}):
        path = tmp_path / "wrapped.pt"
        torch.save(wrapped, path)
        state = read_state_dict(path)
        assert set(state) == set(full)
        model = _cnn(6)
        report = init_from_file(model, path)
        assert len(report.loaded) == len(full) and not report.shape_mismatch
        assert all(v.dtype == full[k].dtype for k, v in model.state_dict().items())


def test_medfed_checkpoint_and_segmenter_into_classifier(tmp_path: Path) -> None:
    """A MedFed checkpoint.pt loads by its ``weights``; a U-Net's weights match no CNN tensor."""
    weights = _cnn(7).state_dict()
    save_checkpoint(tmp_path, Checkpoint(round=3, weights=weights, strategy_state={}))
    model = _cnn(8)
    assert len(init_from_file(model, tmp_path / "checkpoint.pt").loaded) == len(weights)
    unet = build_model(TaskConfig(kind="segmentation", image_size=[32, 32]),
                       ModelConfig(name="unet", channels=[8, 16]), seed=0)
    torch.save(unet.state_dict(), tmp_path / "unet.pt")
    with pytest.raises(TransferError, match=r"unet\.pt: no tensor matches"):
        init_from_file(_cnn(9), tmp_path / "unet.pt")


def test_unreadable_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model.init_weights=.*gone\.pt: file not found"):
        small_settings(tmp_path, "model.init_weights=gone.pt")  # before anything starts
    with pytest.raises(TransferError, match=r"missing\.pt: file not found"):
        read_state_dict(tmp_path / "missing.pt")
    (tmp_path / "notes.pt").write_text("not a tensor file")
    with pytest.raises(TransferError, match=r"notes\.pt: cannot be read"):
        read_state_dict(tmp_path / "notes.pt")
    torch.save({"epoch": 1, "lr": 0.1}, tmp_path / "numbers.pt")
    with pytest.raises(TransferError, match=r"numbers\.pt: no state dict found"):
        read_state_dict(tmp_path / "numbers.pt")
    # weights_only=True refuses arbitrary pickled objects (a whole nn.Module)
    torch.save(_cnn(0), tmp_path / "module.pt")
    with pytest.raises(TransferError, match=r"module\.pt: cannot be read"):
        read_state_dict(tmp_path / "module.pt")


def test_initial_model_reports_into_the_run_folder_and_never_overrides_a_resume(
        tmp_path: Path) -> None:
    source = _cnn(11, classes=3)
    torch.save(source.state_dict(), tmp_path / "prior.pt")
    settings = small_settings(tmp_path, f"model.init_weights={tmp_path / 'prior.pt'}")
    run_dir = Path(settings.run_dir)
    run_dir.mkdir(parents=True)
    model, report = initial_model(settings, run_dir)
    assert report is not None and report.shape_mismatch
    written = json.loads((run_dir / TRANSFER_FILE).read_text())
    assert written["loaded"] == len(report.loaded) > 0 and written["shape_mismatch"] >= 1
    loaded = report.loaded[0]
    assert _same(model.state_dict()[loaded], source.state_dict()[loaded])
    # resumed with a checkpoint: the file is not applied again
    save_checkpoint(run_dir, Checkpoint(round=1, weights=model.state_dict(), strategy_state={}))
    resumed = small_settings(tmp_path, f"model.init_weights={tmp_path / 'prior.pt'}",
                             "resume=true")
    fresh, none = initial_model(resumed, run_dir)
    assert none is None
    assert not _same(fresh.state_dict()[loaded], source.state_dict()[loaded])


def test_freeze_patterns_and_config_checks(tmp_path: Path) -> None:
    model = _cnn(0)
    names = [n for n, _ in model.named_parameters()]
    biases = matching_parameters(model, ["*.bias"], "model.freeze")
    assert biases and all(n.endswith(".bias") for n in biases)
    top = names[0].split(".")[0]
    assert matching_parameters(model, [top], "model.freeze") == [n for n in names
                                                                 if n.startswith(top + ".")]
    with pytest.raises(TransferError, match="model.freeze: pattern 'featurez'"):
        freeze(model, ["featurez"])
    with pytest.raises(ConfigError, match="model.freeze_rounds"):
        small_settings(tmp_path, "model.freeze=[net]")
    settings = small_settings(tmp_path, "model.freeze=[nope]", "model.freeze_rounds=1")
    with pytest.raises(TransferError, match="model.freeze: pattern 'nope'"):
        initial_model(settings, tmp_path)


@pytest.mark.parametrize("privacy", ["none", "dp_sgd"])
def test_frozen_layers_stay_unchanged_through_train_round(tmp_path: Path, privacy: str) -> None:
    """Real local rounds (plain and Opacus DP-SGD): frozen tensors stay, the rest train."""
    model = build_model(TASK, ModelConfig(), seed=0)
    head = [n for n, _ in model.named_parameters()][-2:]  # the last layer's weight and bias
    body = [n for n, _ in model.named_parameters() if n not in head]
    patterns = [n.rsplit(".", 1)[0] for n in body]
    overrides = [f"privacy={privacy}", "model.freeze_rounds=1",
                 f"model.freeze=[{','.join(sorted(set(patterns)))}]"]
    if privacy == "dp_sgd":
        overrides.append("privacy.noise_multiplier=1.0")
    settings = small_settings(tmp_path, *overrides)
    hospital = Hospital(index=0, count=3, name="hospital-0")
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    first = train_round(settings, hospital, weights, server_round=1).weights
    assert all(_same(first[n], weights[n]) for n in body)
    assert any(not _same(first[n], weights[n]) for n in head)
    second = train_round(settings, hospital, weights, server_round=2).weights
    assert sum(not _same(second[n], weights[n]) for n in body) > len(body) // 2
