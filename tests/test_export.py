"""The exported model folder: layout, metadata, atomic replacement, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.config import settings_from_dict, settings_to_json
from common.export import FORMAT, ExportError, export_model, load_export
from common.models import build_model


def test_export_layout_and_round_trip(tmp_path: Path) -> None:
    settings = settings_from_dict({"model": {"channels": [8, 16]}, "data": {"source": "medmnist",
                                  "path": "x.npz"}})
    model = build_model(settings.task, settings.model, seed=1)
    folder = export_model(tmp_path, settings, model.state_dict(), threshold=None,
                          weights_from="best_model.pt")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")
                  if p.is_file()) == ["model/configs/metadata.json",
                                      "model/configs/settings.json", "model/models/model.pt"]
    meta = json.loads((folder / "configs" / "metadata.json").read_text())
    assert meta["format"] == FORMAT and meta["weights_from"] == "best_model.pt"
    assert meta["preprocessing"]["source"] == "medmnist" and meta["threshold"] is None
    assert (folder / "configs" / "settings.json").read_text() == settings_to_json(settings)
    loaded = load_export(tmp_path)
    assert loaded.threshold is None and loaded.path == folder
    for name, tensor in model.state_dict().items():
        assert loaded.model.state_dict()[name].equal(tensor)
    # a second export replaces the first whole
    export_model(tmp_path, settings, model.state_dict(), threshold={"value": 0.2},
                 weights_from="final_model.pt")
    assert load_export(folder).threshold == 0.2
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_weights_that_do_not_match_are_named(tmp_path: Path) -> None:
    small = settings_from_dict({"model": {"channels": [8, 16]}})
    wide = settings_from_dict({"model": {"channels": [16, 32]}})
    export_model(tmp_path, small, build_model(wide.task, wide.model).state_dict(),
                 threshold=None, weights_from="final_model.pt")
    with pytest.raises(ExportError, match=r"model\.pt do not match"):
        load_export(tmp_path)
    with pytest.raises(ExportError, match="not an exported MedFed model"):
        load_export(tmp_path / "model" / "models")
