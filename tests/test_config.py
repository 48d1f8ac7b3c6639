"""Config composition and validation: typos and bad values fail with one line."""

from __future__ import annotations

import pytest

from common.compose import compose_settings
from common.config import ConfigError, Settings, settings_from_json, settings_to_json


def test_default_composes_to_synthetic_three_hospitals() -> None:
    settings = compose_settings([])
    assert isinstance(settings, Settings)
    assert settings.data.source == "synthetic"
    assert settings.federation.num_hospitals >= 3
    assert settings.task.kind == "classification" and settings.model.name == "cnn"


@pytest.mark.parametrize("experiment,kind,model", [
    ("pneumonia", "classification", "cnn"),
    ("brain_mri", "segmentation", "unet"),
])
def test_experiments_compose(experiment: str, kind: str, model: str) -> None:
    settings = compose_settings([f"experiment={experiment}"])
    assert settings.name == experiment
    assert settings.task.kind == kind and settings.model.name == model
    assert settings.data.path


@pytest.mark.parametrize("override,expected", [
    ("train.lrr=0.1", "unknown config key 'train.lrr'; allowed keys under train: optimizer, lr"),
    ("model=resnet99", "model=resnet99 is not valid; allowed values: attentionunet, basicunet"),
    ("strategy=fedfoo", "strategy=fedfoo is not valid; allowed values: fedadagrad"),
    ("experiment=nope", "experiment=nope is not valid; allowed values: brain_mri, brain_mri_dp"),
    ("privacy.mode=maybe", "privacy.mode='maybe' is not valid; allowed values: none, dp_sgd"),
    ("federation.min_train=7", "federation.min_train=7 is not valid; it must lie in [1, "),
    ("data.split=stratified", "data.split='stratified' is not valid; allowed values: iid, dirich"),
    ("train.lr=-1", "train.lr=-1.0 is not valid; it must be > 0"),
    ("colour=blue", "unknown config key 'colour'; allowed top-level keys:"),
    ("train.lr=fast", "train.lr:"),
])
def test_bad_values_fail_with_one_line_naming_the_key(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        compose_settings([override])
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_segmentation_refuses_a_classifier() -> None:
    with pytest.raises(ConfigError, match=r"model.name .*segmentation.*'cnn'.*unet"):
        compose_settings(["experiment=brain_mri", "model=cnn"])


def test_settings_survive_the_run_config_round_trip() -> None:
    settings = compose_settings(["experiment=pneumonia", "federation.rounds=7"])
    again = settings_from_json(settings_to_json(settings))
    assert again == settings


def test_empty_run_config_explains_how_to_start() -> None:
    with pytest.raises(ConfigError, match="simulate.py"):
        settings_from_json("")
