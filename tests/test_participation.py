"""Leaving hospitals out (``data.hospitals``): the others' splits stay, its images unused.

The data test runs on the real PneumoniaMNIST file (Dirichlet label skew over
3 hospitals); the simulation test runs a real Flower simulation with two of
three synthetic hospitals.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import ConcatDataset, Dataset

from client.hospital import hospital_from_node_config
from common import wire
from common.config import ConfigError, DataConfig, FederationConfig, Settings
from common.data import load_pooled, load_site
from common.participation import left_out, taking_part
from simulate import simulate
from tests.conftest import PNEUMONIA, needs_shared, small_settings, stop_leftovers


def _images(dataset: Dataset) -> set[bytes]:
    """Every image of ``dataset``, as raw bytes (to compare sets of images)."""
    return {dataset[i][0].numpy().tobytes() for i in range(len(dataset))}  # type: ignore[arg-type]


def _same(a: Dataset, b: Dataset) -> bool:
    """Whether two datasets hold the same images and targets in the same order."""
    if len(a) != len(b):  # type: ignore[arg-type]
        return False
    return all(torch.equal(a[i][0], b[i][0]) and torch.equal(a[i][1], b[i][1])
               for i in range(len(a)))  # type: ignore[arg-type]


def _without(settings: Settings, hospitals: list[int]) -> Settings:
    data = dataclasses.replace(settings.data, hospitals=hospitals)
    federation = dataclasses.replace(settings.federation, min_train=1, min_evaluate=1)
    return dataclasses.replace(settings, data=data, federation=federation)


@needs_shared(PNEUMONIA)
def test_held_out_hospital_is_in_no_split_and_the_others_are_unchanged() -> None:
    full = Settings(data=DataConfig(source="medmnist", path=str(PNEUMONIA), split="dirichlet",
                                    dirichlet_alpha=1.0, test_fraction=0.1),
                    federation=FederationConfig(num_hospitals=3, min_train=1, min_evaluate=1))
    without_1 = _without(full, [0, 2])
    assert taking_part(without_1) == [0, 2] and left_out(without_1) == [1]
    for hospital in (0, 2):
        ours, theirs = load_site(without_1, hospital), load_site(full, hospital)
        for split in ("train", "val", "test"):
            assert _same(getattr(ours, split), getattr(theirs, split)), (hospital, split)
    held = load_site(full, 1)
    held_images = _images(ConcatDataset([held.train, held.val, held.test]))
    pooled = load_pooled(without_1)
    used = _images(ConcatDataset([pooled.train, pooled.val, pooled.test]))
    assert held_images and used and not held_images & used
    full_pool = load_pooled(full)
    assert len(pooled.train) < len(full_pool.train)  # type: ignore[arg-type]
    local = load_pooled(_without(full, [2]))  # local-only training at hospital 2
    assert _same(local.train, load_site(full, 2).train)


def test_bad_hospital_lists_name_the_key() -> None:
    with pytest.raises(ConfigError, match="data.hospitals"):
        DataConfig(hospitals=[0, 0])
    with pytest.raises(ConfigError, match="data.hospitals"):
        DataConfig(hospitals=[])
    with pytest.raises(ConfigError, match="outside federation.num_hospitals=3"):
        Settings(data=DataConfig(hospitals=[0, 3]))
    with pytest.raises(ConfigError, match="federation.min_evaluate=3 exceeds the 2"):
        Settings(data=DataConfig(hospitals=[0, 2]),
                 federation=FederationConfig(num_hospitals=3, min_train=2, min_evaluate=3))


def test_simulated_nodes_map_to_the_hospitals_taking_part() -> None:
    settings = _without(Settings(), [0, 2])
    node = {wire.PARTITION_ID: 1, wire.NUM_PARTITIONS: 2}
    hospital = hospital_from_node_config(node, settings)
    assert (hospital.index, hospital.count, hospital.name) == (2, 3, "hospital-2")
    assert hospital_from_node_config(node).index == 1  # no experiment: Flower's number
    deployed = hospital_from_node_config({**node, wire.LEDGER_PATH: "/tmp/ledger.json"}, settings)
    assert deployed.index == 1  # a deployed hospital keeps its own identity
    with pytest.raises(ValueError, match="names 2 hospitals"):
        hospital_from_node_config({wire.PARTITION_ID: 0, wire.NUM_PARTITIONS: 3}, settings)


@pytest.mark.slow
def test_simulation_without_a_hospital(tmp_path: Path) -> None:
    """Two SuperNodes train as hospitals 0 and 2; hospital 1 never appears."""
    settings = small_settings(tmp_path, "federation.rounds=1", "data.hospitals=[0,2]",
                              "federation.min_evaluate=2", "data.central_test=false")
    try:
        summary = simulate(settings)
    finally:
        stop_leftovers(tmp_path)
    assert sorted(summary["hospitals"]) == ["hospital-0", "hospital-2"]
    rows = [json.loads(line) for line in
            (Path(settings.run_dir) / "metrics.jsonl").read_text().splitlines()]
    trained = {r["hospital"] for r in rows if r["phase"] == "train"}
    assert trained == {"hospital-0", "hospital-2", "overall"}
