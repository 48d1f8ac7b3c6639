"""report.html (server.run_report) and experiment tracking (server.tracking).

Fast tests feed real RunRecorder rows and real central-test predictions (a
real MONAI network on PneumoniaMNIST's test images, a real U-Net on a brain
MRI NIfTI slice); the slow one runs the three presets end to end.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from common.compose import compose_settings, finalize, settings_yaml
from common.config import Settings
from common.models import build_model
from common.processes import stop_pids
from server.report import RunRecorder
from server.report import main as report_main
from server.round_report import PhaseReport, RoundReport
from server.run_report import PREDICTIONS_FILE, REPORT_FILE, build_report
from server.tracking import mlflow_client, open_tracker
from simulate import main as simulate_main
from tests.conftest import BRAIN, PNEUMONIA, ROOT, needs_shared, small_settings

SOURCES = {"metrics", "central-test"}


def chromium() -> str | None:
    """The headless browser's path, if one is installed."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def render(page: Path, out: Path) -> np.ndarray:
    """Screenshot ``page`` in headless Chromium (1200x3000); the picture as uint8 [H, W, 3]."""
    binary = chromium()
    if binary is None:
        pytest.skip("no chromium, chromium-browser or google-chrome binary (.ci/run installs it)")
    proc = subprocess.Popen(
        [binary, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={out}",
         "--window-size=1200,3000", f"--user-data-dir={out.parent / 'chromium-profile'}",
         page.resolve().as_uri()], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        proc.wait(timeout=90)
    finally:
        stop_pids([proc.pid], grace_s=2)
    return np.asarray(Image.open(out).convert("RGB"))


def check_rendered(page: Path, tmp_path: Path) -> None:
    """The page renders to a picture that is not blank (text and plots, not one colour)."""
    picture = render(page, tmp_path / "screenshot.png")
    assert picture.shape[:2] == (3000, 1200)
    not_white = (picture < 200).any(axis=2).mean()
    assert not_white > 0.01 and len(np.unique(picture.reshape(-1, 3), axis=0)) > 50


def image_sources(page: Path) -> list[str]:
    """``data-source`` of every ``<img>`` (None where missing); every image is embedded."""
    text = page.read_text()
    tags = re.findall(r"<img\b[^>]*>", text)
    assert all('src="data:image/png;base64,' in tag for tag in tags)
    assert "http://" not in text and "https://" not in text
    return [m.group(1) if (m := re.search(r'data-source="([^"]*)"', tag)) else "none"
            for tag in tags]


def record_two_rounds(settings: Settings, *, dp: bool) -> RunRecorder:
    """Real RunRecorder rows for 2 rounds x 2 hospitals, as the ServerApp writes them."""
    Path(settings.run_dir).mkdir(parents=True)
    (Path(settings.run_dir) / "config.yaml").write_text(settings_yaml(settings))
    recorder = RunRecorder(Path(settings.run_dir), "classification", 2,
                           ["hospital-0", "hospital-1"], tracker=open_tracker(settings))
    for round_ in (1, 2):
        train = [{"hospital": i, "num-examples": 50.0 + i, "train-loss": 0.7 / round_ + i / 10,
                  **({"epsilon": 1.5 * round_ + i, "delta": 1e-5} if dp else {})}
                 for i in (0, 1)]
        evaluate = [{"hospital": i, "auc": 0.6 + round_ / 10, "auc-ci-low": 0.5,
                     "auc-ci-high": 0.9, "accuracy": 0.7, "loss": 0.5, "val-loss": 0.6 / round_,
                     "num-examples": 20.0, "roc-tp": [1, 2]} for i in (0, 1)]
        report = RoundReport(round_, train=PhaseReport("train", tuple(train), {"train-loss": 0.5}),
                             evaluate=PhaseReport("evaluate", tuple(evaluate), {"auc": 0.7}),
                             central={"auc": 0.8, "num-examples": 64.0})
        recorder.write_rows(report)
        recorder.end_round(report)
    recorder.write_summary(experiment=settings.name, rounds=2, wall_time_s=1.0,
                           selection={"round": 2, "metric": "val-loss", "value": 0.3})
    recorder.close_tracker()
    return recorder


def write_classification_predictions(run_dir: Path, settings: Settings) -> None:
    """Central predictions of a real (untrained) MONAI CNN on 64 PneumoniaMNIST test images."""
    with np.load(PNEUMONIA) as data:
        images = torch.from_numpy(data["test_images"][:64].astype(np.float32) / 255.0)
        labels = data["test_labels"][:64].reshape(-1).astype(np.int64)
    model = build_model(settings.task, settings.model, seed=0).eval()
    with torch.no_grad():
        probs = torch.softmax(model(images[:, None]), dim=1).numpy()
    np.savez(run_dir / PREDICTIONS_FILE, probs=probs.astype(np.float32), labels=labels)


@needs_shared(PNEUMONIA)
def test_classification_report_and_tensorboard(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    settings = small_settings(tmp_path, "tracking=tensorboard")
    recorder = record_two_rounds(settings, dp=True)
    write_classification_predictions(recorder.run_dir, settings)
    page = build_report(recorder.run_dir)
    sources = image_sources(page)
    # train loss, test auc, validation loss, epsilon | ROC, calibration, confusion matrix
    assert sources == ["metrics"] * 4 + ["central-test"] * 3
    text = page.read_text()
    assert "0.800 [0.500, 0.900]" in text and "[n/a]" in text  # hospital / central row
    assert "none chosen: 0.5 is used" in text and "run_dir" in text  # config.yaml shown
    check_rendered(page, tmp_path)
    events = EventAccumulator(str(recorder.run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/train-loss/hospital-0", "train/epsilon/hospital-1", "evaluate/auc/overall",
            "central/auc/central", "round/elapsed_s/overall"} <= tags
    assert not any("roc-tp" in tag for tag in tags)
    loss = events.Scalars("train/train-loss/hospital-0")
    assert [e.step for e in loss] == [1, 2]
    assert [e.value for e in loss] == pytest.approx([0.7, 0.35])
    assert "config/text_summary" in events.Tags()["tensors"]


def test_mlflow_run_readable_by_mlflow(tmp_path: Path) -> None:
    settings = small_settings(tmp_path, "tracking=mlflow")
    recorder = record_two_rounds(settings, dp=False)
    client = mlflow_client(recorder.run_dir / "mlruns")
    experiment = client.get_experiment_by_name(settings.name)
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "evaluate/auc/hospital-1")
    assert [(m.step, m.value) for m in history] == [(1, pytest.approx(0.7)),
                                                    (2, pytest.approx(0.8))]
    assert run.data.params["federation.rounds"] == "2"
    assert run.data.params["tracking"] == "mlflow"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "config.json" in artifacts
    assert not (recorder.run_dir / "tensorboard").exists()


@needs_shared(BRAIN)
def test_segmentation_slices_and_rebuild_command(tmp_path: Path) -> None:
    settings = finalize(compose_settings(
        ["task=segmentation", "model=unet", "model.channels=[8,16]", "tracking=none",
         "task.image_size=[64,64]", f"run_dir={tmp_path / 'run'}"]), base=ROOT)
    run_dir = Path(settings.run_dir)
    RunRecorder(run_dir, "segmentation", 1, ["site-a"]).write_summary(
        experiment="seg", rounds=0, wall_time_s=0.0)
    # A real NIfTI slice and mask; the prediction of a real (untrained) U-Net
    volume = nib.load(BRAIN / "site-a" / "imagesTr" / "mni152.nii.gz").get_fdata()
    mask = nib.load(BRAIN / "site-a" / "labelsTr" / "mni152.nii.gz").get_fdata()
    middle = volume.shape[2] // 2
    image = torch.nn.functional.interpolate(
        torch.from_numpy(volume[None, None, :, :, middle].astype(np.float32)), size=(64, 64))
    image = image / image.max()
    truth = torch.nn.functional.interpolate(
        torch.from_numpy(mask[None, None, :, :, middle].astype(np.float32)), size=(64, 64))
    model = build_model(settings.task, settings.model, seed=0).eval()
    with torch.no_grad():
        pred = model(image).argmax(dim=1)
    np.savez(run_dir / PREDICTIONS_FILE, images=image.numpy(),
             truth=(truth[:, 0] > 0.5).numpy().astype(np.uint8), pred=pred.numpy().astype(np.uint8))
    assert report_main([str(run_dir)]) == 0
    page = run_dir / REPORT_FILE
    assert image_sources(page) == ["central-test"]
    assert "No per-round metrics" in page.read_text()
    assert report_main([str(tmp_path / "nowhere")]) == 2


@pytest.mark.slow
@needs_shared(PNEUMONIA)
@needs_shared(BRAIN)
def test_presets_write_report_and_tracking(tmp_path: Path) -> None:
    """pneumonia_dp (MLflow) and brain_mri (TensorBoard), 1 round x 1 epoch each.

    pneumonia_dp is the pneumonia preset plus DP-SGD, so its report has all of
    pneumonia's parts and the epsilons; test_simulation's default run checks
    a run's report and TensorBoard scalars once more.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for experiment, tracking in (("pneumonia_dp", "mlflow"), ("brain_mri", "tensorboard")):
        run_dir = tmp_path / experiment
        assert simulate_main([f"experiment={experiment}", "federation.rounds=1",
                              "federation.local_epochs=1", f"tracking={tracking}",
                              f"run_dir={run_dir}"]) == 0
        page = run_dir / REPORT_FILE
        sources = image_sources(page)
        assert sources and set(sources) <= SOURCES
        central = (run_dir / PREDICTIONS_FILE).is_file()
        assert ("central-test" in sources) == central
        check_rendered(page, tmp_path)
        hospital = "site-a" if experiment == "brain_mri" else "hospital-0"
        metric = "dice" if experiment == "brain_mri" else "auc"
        if tracking == "mlflow":
            client = mlflow_client(run_dir / "mlruns")
            (run,) = client.search_runs([client.get_experiment_by_name(experiment)
                                         .experiment_id])
            history = client.get_metric_history(run.info.run_id, f"evaluate/{metric}/{hospital}")
            assert [m.step for m in history] == [1]
            for i in range(3):  # every hospital's epsilon, per round
                epsilons = client.get_metric_history(run.info.run_id, f"train/epsilon/hospital-{i}")
                assert [m.step for m in epsilons] == [1] and epsilons[0].value > 0
            assert json.loads((run_dir / "summary.json").read_text())["privacy"]
            continue
        events = EventAccumulator(str(run_dir / "tensorboard"))
        events.Reload()
        assert f"evaluate/{metric}/{hospital}" in set(events.Tags()["scalars"])
