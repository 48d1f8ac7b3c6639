"""Compose ``conf/`` with Hydra into validated :class:`~common.config.Settings`.

Every entry point (``simulate.py``, the ``server`` command, the baseline, the
evaluation command, benchmarks) goes through :func:`compose_settings`, so a
typo or a bad value fails the same way everywhere: one :class:`ConfigError`
line naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from common.config import SECTIONS, ConfigError, Settings

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
SCHEMA_NAME = "medfed_schema"


def register_schema() -> None:
    """Register the typed schema in Hydra's ConfigStore (idempotent)."""
    ConfigStore.instance().store(name=SCHEMA_NAME, node=Settings)


def _group_options(conf_dir: Path, group: str) -> list[str]:
    return sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))


def _allowed_keys(full_key: str) -> str:
    section = full_key.split(".")[0]
    cls = SECTIONS.get(section)
    if cls is None:
        names = ", ".join(sorted(f.name for f in dataclasses.fields(Settings)))
        return f"allowed top-level keys: {names}"
    names = ", ".join(f.name for f in dataclasses.fields(cls))
    return f"allowed keys under {section}: {names}"


def _one_line(err: Exception, conf_dir: Path) -> str:
    text = str(err)
    cause = err.__cause__ or err.__context__
    cause_text = f"{text} {cause}" if cause else text
    missing = re.search(r"Could not find '([\w/]+)/(\w+)'", cause_text)
    if missing:
        group, option = missing.groups()
        options = ", ".join(_group_options(conf_dir, group))
        return f"{group}={option} is not valid; allowed values: {options}"
    key = re.search(r"full_key: ([\w.]+)", cause_text) or re.search(
        r"override '([\w.]+)'", cause_text)
    if key and ("not in struct" in cause_text or "not in '" in cause_text):
        return f"unknown config key '{key.group(1)}'; {_allowed_keys(key.group(1))}"
    if key:
        detail = cause_text.splitlines()[0] if cause_text else text
        return f"{key.group(1)}: {detail}"
    return text.splitlines()[0] if text else type(err).__name__


def compose_settings(overrides: Sequence[str] = (), *, conf_dir: Path = CONF_DIR,
                     config_name: str = "config") -> Settings:
    """Compose ``conf_dir/config_name.yaml`` with ``overrides`` and validate it.

    Args:
        overrides: Hydra overrides such as ``experiment=pneumonia`` or
            ``federation.rounds=5``.
        conf_dir: folder holding ``config.yaml`` and the groups.
        config_name: primary config file name without ``.yaml``.

    Raises:
        ConfigError: one line naming the bad key or group and what is allowed.
    """
    register_schema()
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=list(overrides))
        cfg_obj = OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        if isinstance(err.__cause__, ConfigError):
            raise err.__cause__ from None
        raise ConfigError(_one_line(err, conf_dir)) from None
    if not isinstance(cfg_obj, Settings):
        raise ConfigError(f"{conf_dir}/{config_name}.yaml must start its defaults with "
                          f"'{SCHEMA_NAME}'")
    return cfg_obj


def settings_yaml(settings: Settings) -> str:
    """The resolved settings as YAML (written into every run folder)."""
    return OmegaConf.to_yaml(OmegaConf.structured(settings))


def load_run_settings(config_yaml: Path, overrides: Sequence[str] = ()) -> Settings:
    """Settings saved in a run folder's ``config.yaml``, with dotted overrides.

    Args:
        config_yaml: the resolved config a run wrote.
        overrides: ``key=value`` pairs, e.g. ``data.path=/data/test.npz``.

    Raises:
        ConfigError: missing file, unknown key or bad value (one line).
    """
    if not config_yaml.is_file():
        raise ConfigError(f"{config_yaml} not found: pass a run folder written by MedFed")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Settings), OmegaConf.load(config_yaml),
                              OmegaConf.from_dotlist(list(overrides)))
        cfg_obj = OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except (OmegaConfBaseException, ValueError) as err:
        if isinstance(err.__cause__, ConfigError):
            raise err.__cause__ from None
        raise ConfigError(_one_line(err, CONF_DIR)) from None
    assert isinstance(cfg_obj, Settings)
    return cfg_obj


def finalize(settings: Settings, *, base: Path, suffix: str = "") -> Settings:
    """Make paths absolute and pick the run folder, in place.

    The apps run in other working directories (Flower installs them under
    ``FLWR_HOME``), so ``data.path``, ``model.init_weights`` and ``run_dir``
    become absolute, relative to ``base``. An empty ``run_dir`` becomes
    ``runs/<name><suffix>-<time>``.

    Raises:
        ConfigError: ``model.init_weights`` names no file (a fresh run).
    """
    if not settings.run_dir:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        settings.run_dir = str(Path("runs") / f"{settings.name}{suffix}-{stamp}")
    settings.run_dir = str((base / settings.run_dir).resolve())
    if settings.data.path:
        settings.data.path = str((base / settings.data.path).resolve())
    if settings.model.init_weights:
        weights = (base / settings.model.init_weights).resolve()
        if not settings.resume and not weights.is_file():  # fail before starting anything
            raise ConfigError(f"model.init_weights={weights}: file not found")
        settings.model.init_weights = str(weights)
    return settings
