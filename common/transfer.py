"""Transfer learning: start a model from a weights file, and freeze named layers.

:func:`read_state_dict` reads a weights file with ``torch.load(...,
weights_only=True)`` (tensors and plain containers only: a file cannot run
code when it is read) and finds the state dict inside it: a plain state dict
(a MedFed run's ``final_model.pt`` / ``best_model.pt``, ``torch.save(
model.state_dict())``, a MONAI bundle's ``models/model.pt``), or a
checkpoint dict holding one under a common key (:data:`STATE_KEYS`: a MedFed
``checkpoint.pt``'s ``weights``, Lightning's ``state_dict``, MONAI's
``CheckpointSaver`` ``model``). Wrapper prefixes (``module.`` of
DataParallel, ``_module.`` of Opacus) are stripped.

:func:`load_matching` loads it non-strictly: a tensor is loaded when the
model has a tensor of that name and shape; the :class:`TransferReport` lists
what was loaded, what had another shape, what the model has that the file
lacks, and what the file has that the model lacks. Nothing is downloaded.

:func:`freeze` switches ``requires_grad`` off for parameters named by
prefixes or glob patterns; an optimizer built afterwards
(:func:`common.training.make_optimizer`) and Opacus (which clips and noises
only parameters that require gradients) leave them unchanged.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

STATE_KEYS = ("state_dict", "model_state_dict", "model", "weights", "net", "network",
              "module")
"""Keys under which checkpoint dicts commonly keep the model's state dict."""
WRAPPER_PREFIXES = ("module.", "_module.")
"""Prefixes that DataParallel / Opacus wrappers add to every key."""
SHOWN = 5
"""Names of each kind the report's summary line and JSON list (counts are complete)."""


class TransferError(ValueError):
    """A weights file is missing, unreadable, holds no state dict, or matches nothing."""


@dataclass(frozen=True)
class TransferReport:
    """What :func:`load_matching` loaded from a weights file into a model.

    Attributes:
        source: the weights file.
        loaded: names of the model's tensors taken from the file.
        shape_mismatch: ``(name, shape in file, shape in model)`` for names
            both have with different shapes (kept at the model's values).
        missing_in_file: the model's tensors the file lacks (kept).
        unexpected_in_file: the file's tensors the model lacks (ignored).
    """

    source: str
    loaded: list[str] = field(default_factory=list)
    shape_mismatch: list[tuple[str, list[int], list[int]]] = field(default_factory=list)
    missing_in_file: list[str] = field(default_factory=list)
    unexpected_in_file: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """Counts of each kind and the first :data:`SHOWN` names (JSON-ready)."""
        return {
            "source": self.source,
            "loaded": len(self.loaded),
            "shape_mismatch": len(self.shape_mismatch),
            "missing_in_file": len(self.missing_in_file),
            "unexpected_in_file": len(self.unexpected_in_file),
            "first_loaded": self.loaded[:SHOWN],
            "first_shape_mismatch": [
                {"name": n, "file": f, "model": m} for n, f, m in self.shape_mismatch[:SHOWN]],
            "first_missing_in_file": self.missing_in_file[:SHOWN],
            "first_unexpected_in_file": self.unexpected_in_file[:SHOWN],
        }

    def line(self) -> str:
        """One log line: counts, and the first mismatched names."""
        text = (f"{len(self.loaded)} tensors loaded from {self.source}, "
                f"{len(self.shape_mismatch)} with another shape, "
                f"{len(self.missing_in_file)} missing in the file, "
                f"{len(self.unexpected_in_file)} in the file but not in the model")
        if self.shape_mismatch:
            text += "; shape differs: " + ", ".join(
                f"{n} {f}->{m}" for n, f, m in self.shape_mismatch[:SHOWN])
        return text


def _tensors(value: object) -> dict[str, torch.Tensor] | None:
    """``value`` as a non-empty name -> tensor dict, or None if it is not one."""
    if not isinstance(value, Mapping) or not value:
        return None
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()):
        return None
    return dict(value)


def _strip_wrappers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in WRAPPER_PREFIXES:
        if all(key.startswith(prefix) for key in state):
            state = {key[len(prefix):]: value for key, value in state.items()}
    return state


def find_state_dict(raw: object, source: str) -> dict[str, torch.Tensor]:
    """The state dict inside a loaded weights file (see the module docstring).

    Raises:
        TransferError: neither ``raw`` nor any :data:`STATE_KEYS` entry of it
            is a name -> tensor dict (names the file and its top-level keys).
    """
    state = _tensors(raw)
    if state is None and isinstance(raw, Mapping):
        state = next((found for key in STATE_KEYS if (found := _tensors(raw.get(key)))), None)
    if state is None:
        keys = sorted(map(str, raw))[:8] if isinstance(raw, Mapping) else type(raw).__name__
        raise TransferError(
            f"model.init_weights={source}: no state dict found (a dict of tensors, or one "
            f"under {', '.join(STATE_KEYS)}); the file holds {keys}")
    return _strip_wrappers(state)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read the state dict in weights file ``path`` on the CPU, safely.

    Raises:
        TransferError: the file is missing or cannot be read as tensors
            (e.g. a TorchScript ``model.ts`` or a pickle of arbitrary
            objects, which ``weights_only=True`` refuses), or holds no
            state dict; the message names the file.
    """
    if not path.is_file():
        raise TransferError(f"model.init_weights={path}: file not found")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - every read failure is reported the same way
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise TransferError(
            f"model.init_weights={path}: cannot be read as PyTorch weights "
            f"({type(err).__name__}: {first[:200]})") from err
    return find_state_dict(raw, str(path))


def load_matching(model: nn.Module, state: Mapping[str, torch.Tensor], source: str
                  ) -> TransferReport:
    """Load the tensors of ``state`` whose names and shapes ``model`` has, in place.

    Loaded tensors take the model's dtype (a float64 file fills a float32
    model). Everything else keeps the model's current values.

    Raises:
        TransferError: not a single tensor matches (wrong file or model),
            with example names from both sides.
    """
    own = model.state_dict()
    loaded, mismatch = [], []
    matched: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name not in own:
            continue
        if tuple(tensor.shape) != tuple(own[name].shape):
            mismatch.append((name, list(tensor.shape), list(own[name].shape)))
            continue
        matched[name] = tensor.to(own[name].dtype)
        loaded.append(name)
    if not matched:
        raise TransferError(
            f"model.init_weights={source}: no tensor matches the model by name and shape "
            f"(file: {sorted(state)[:3]}..., model: {sorted(own)[:3]}...); "
            f"{len(mismatch)} names match with other shapes")
    model.load_state_dict(matched, strict=False)
    return TransferReport(
        source=source, loaded=loaded, shape_mismatch=mismatch,
        missing_in_file=[n for n in own if n not in state],
        unexpected_in_file=[n for n in state if n not in own])


def init_from_file(model: nn.Module, path: Path) -> TransferReport:
    """:func:`read_state_dict` then :func:`load_matching` into ``model``."""
    return load_matching(model, read_state_dict(path), str(path))


def _named_by(name: str, pattern: str) -> bool:
    prefix = pattern.rstrip(".")
    return (fnmatch.fnmatchcase(name, pattern) or name == prefix
            or name.startswith(prefix + "."))


def matching_parameters(model: nn.Module, patterns: Sequence[str], key: str) -> list[str]:
    """Names of ``model``'s parameters named by any of ``patterns``.

    A pattern is a prefix of dotted names (``features.conv0`` names
    ``features.conv0.weight``) or a glob (``*.bias``, ``class_layers.*``).

    Raises:
        TransferError: a pattern names no parameter (a typo would otherwise
            freeze nothing); the message names ``key`` and shows real names.
    """
    names = [name for name, _ in model.named_parameters()]
    for pattern in patterns:
        if not any(_named_by(name, pattern) for name in names):
            tops = sorted({name.split(".")[0] for name in names})
            raise TransferError(
                f"{key}: pattern {pattern!r} names no parameter of the model; its "
                f"parameters start with {', '.join(tops[:10])}")
    return [name for name in names if any(_named_by(name, p) for p in patterns)]


def freeze(model: nn.Module, patterns: Sequence[str], key: str = "model.freeze") -> list[str]:
    """Switch ``requires_grad`` off for the parameters ``patterns`` name; returns their names.

    Call before building the optimizer (and before Opacus' ``make_private``).

    Raises:
        TransferError: a pattern names no parameter (see
            :func:`matching_parameters`).
    """
    frozen = set(matching_parameters(model, patterns, key))
    for name, param in model.named_parameters():
        if name in frozen:
            param.requires_grad_(False)
    return sorted(frozen)


def freeze_for_round(model: nn.Module, patterns: Sequence[str], freeze_rounds: int,
                     server_round: int) -> list[str]:
    """:func:`freeze` ``patterns`` in rounds 1..``freeze_rounds`` (1-based); else nothing."""
    if not patterns or server_round > freeze_rounds:
        return []
    return freeze(model, patterns)
