"""Import MONAI without its walk over every one of its modules.

``import monai`` (MONAI 1.6) ends by walking its whole package and importing
every module, each one twice (``monai.utils.module.load_submodules`` imports
it, then executes it again): detection, pathology, auto3dseg and every other
application MedFed never touches. Each MedFed process that builds a model pays
that before its first batch: the simulation process (which loads both the
ServerApp and the ClientApp), every simulated hospital's Ray actor, every
deployed hospital's ClientApp. Measured on a quiet 2-core machine: 5.0 s for
``import monai`` after torch, 3.0 s for the lean import below with every MONAI
package MedFed uses (``python -X importtime``; 432 against 271 modules).

:func:`lean_monai_imports` puts a finder first on ``sys.meta_path`` that
answers for the top-level ``monai`` package only. Its loader runs MONAI's own
``monai/__init__.py`` (version, warning filters, TF32 detection) with the walk
switched off, then imports the subpackages MedFed uses in an order in which
they import each other without a cycle (:data:`IN_ORDER`; MONAI's packages do
import each other in cycles: ``import monai.networks`` first, with the walk
off, fails). Modules outside the set load on first use as Python normally does, their
dependencies complete by then. (Two threads importing MONAI for the first
time at once race, with MONAI's own import as with this one; the Flower
entry modules import :mod:`common.monai_first` first, which serialises them.)

``MEDFED_MONAI_IMPORT=eager`` in the environment keeps MONAI's own import;
so does a MONAI without the walk this relies on (checked, never assumed).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import os
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

ENV_VAR = "MEDFED_MONAI_IMPORT"
EAGER = "eager"
IN_ORDER = ("monai.apps", "monai.networks.nets", "monai.losses", "monai.metrics",
            "monai.inferers", "monai.visualize")
"""MONAI packages loaded with ``monai``, in this order: ``monai.apps`` first pulls
``monai.data``, ``monai.transforms`` and ``monai.networks`` in the one order that
has no import cycle; then what MedFed's models, losses, metrics and explanations use."""


class _LeanLoader(importlib.abc.Loader):
    """Executes ``monai/__init__.py`` with its walk off, then :data:`IN_ORDER`."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return None  # Python's default module object

    def exec_module(self, module: ModuleType) -> None:
        # monai.utils (where the walk lives) reads monai.__version__ when imported
        version: Any = importlib.import_module("monai._version")
        module.__dict__["__version__"] = str(version.get_versions().get("version", "0+unknown"))
        walker: Any = importlib.import_module("monai.utils.module")
        eager = walker.load_submodules
        walker.load_submodules = lambda *args, **kwargs: ([], [])
        try:
            self._loader.exec_module(module)
        finally:
            walker.load_submodules = eager
        for name in IN_ORDER:
            importlib.import_module(name)


class LeanMonaiFinder(importlib.abc.MetaPathFinder):
    """A meta path finder for the top-level ``monai`` package only."""

    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != "monai":
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not _has_the_walk(spec):
            return spec
        spec.loader = _LeanLoader(spec.loader)
        return spec


def _has_the_walk(spec: importlib.machinery.ModuleSpec) -> bool:
    """True if ``monai/__init__.py`` imports ``load_submodules`` (the walk this skips)."""
    origin = spec.origin
    if origin is None or not os.path.isfile(origin):
        return False
    with open(origin, encoding="utf-8") as handle:
        return "from .utils.module import load_submodules" in handle.read()


def lean_monai_imports() -> None:
    """Make the process' first ``import monai`` the lean one (nothing if already imported).

    Call before anything imports MONAI; calling again changes nothing.
    """
    if os.environ.get(ENV_VAR, "").lower() == EAGER or "monai" in sys.modules:
        return
    if not any(isinstance(finder, LeanMonaiFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, LeanMonaiFinder())
