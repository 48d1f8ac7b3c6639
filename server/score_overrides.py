"""Which data ``server.score`` scores: ``--data PATH`` and data overrides as config entries.

A run folder's ``config.yaml`` is already composed, so a Hydra group override
such as ``data=folder`` cannot be applied by Hydra there; it is expanded here
into one ``data.KEY=VALUE`` entry per data setting (the schema's defaults,
then ``conf/data/NAME.yaml``), placed before the user's ``data.*`` entries.
Group overrides of anything but ``data`` are refused: they would change the
trained model.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

from omegaconf import OmegaConf

from common.compose import CONF_DIR
from common.config import SECTIONS, ConfigError, DataConfig

DATA_KEYS = ("data=", "data.source=", "data.path=")
"""Overrides that name a test set: every sample of it is scored."""


def is_test_set(overrides: Sequence[str], data: Path | None) -> bool:
    """Whether ``--data`` or an override naming the data source or path was given."""
    return data is not None or any(o.startswith(DATA_KEYS) for o in overrides)


def group_entries(option: str, conf_dir: Path = CONF_DIR) -> list[str]:
    """``data.KEY=VALUE`` entries equal to choosing the ``data`` group ``option``.

    Raises:
        ConfigError: no ``conf/data/<option>.yaml`` (the options named).
    """
    path = conf_dir / "data" / f"{option}.yaml"
    if not path.is_file():
        options = ", ".join(sorted(p.stem for p in (conf_dir / "data").glob("*.yaml")))
        raise ConfigError(f"data={option} is not valid; allowed values: {options}")
    values = {f.name: getattr(DataConfig(), f.name) for f in dataclasses.fields(DataConfig)}
    group = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    assert isinstance(group, dict)
    values.update({str(k): v for k, v in group.items() if v != "???"})
    if group.get("path") == "???":
        values["path"] = None  # must come from data.path=... or --data
    return [f"data.{key}={json.dumps(value)}" for key, value in values.items()]


def data_overrides(overrides: Sequence[str], data: Path | None) -> list[str]:
    """The overrides to merge over the run's config: groups expanded, ``--data`` last.

    ``--data PATH`` sets ``data.path`` and ``data.source`` (``medmnist`` for
    a ``.npz`` file, ``folder`` otherwise).

    Raises:
        ConfigError: an override that is not ``key=value``, a group override
            other than ``data=NAME``, or a ``--data`` path that does not exist.
    """
    groups, entries = [], []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not key=value")
        if key == "data":
            groups.extend(group_entries(value))
        elif key in SECTIONS and "." not in key:
            raise ConfigError(f"{item}: a scored run's {key} is fixed by its config.yaml; "
                              "only data=NAME and key=value overrides apply")
        else:
            entries.append(item)
    if data is not None:
        if not data.exists():
            raise ConfigError(f"--data {data}: no such file or folder")
        source = "medmnist" if data.is_file() and data.suffix == ".npz" else "folder"
        entries += [f"data.source={source}", f"data.path={json.dumps(str(data.resolve()))}"]
    return [*groups, *entries]
