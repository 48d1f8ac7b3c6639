"""Import MONAI without loading every one of its ~430 modules up front.

``import monai`` (MONAI 1.6) walks its whole package and imports every
module, twice over (``monai.utils.module.load_submodules`` imports each one
and then executes it again), including ``monai.apps``' detection and
pathology code, ``monai.handlers``' MLflow handler (which imports MLflow,
the largest single cost) and SciPy's signal package. Every MedFed process
pays that before its first batch: the ServerApp, each simulated hospital's
Ray actor, each deployed hospital's ClientApp. Measured side by side on
2 busy cores (``python -X importtime``): 19.4 s for ``import monai`` against
12.6 s for this import of the same subpackages MedFed uses; 432 against 271
MONAI modules loaded; MLflow not imported.

:func:`import_monai_lean` runs MONAI's own ``monai/__init__.py`` (version,
warning filters, TF32 detection) with its eager walk switched off for the
duration of that one call, then imports ``monai.apps``, the order in which
MONAI's subpackages import each other without a cycle. Everything imported
later (``monai.networks.nets``, ``monai.transforms``, ...) loads on demand as
Python normally does. If MONAI is already imported, nothing happens.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys


def import_monai_lean() -> None:
    """Import ``monai`` with its eager load of every submodule skipped.

    Raises:
        ImportError: MONAI is not installed.
    """
    if "monai" in sys.modules:
        return
    spec = importlib.util.find_spec("monai")
    if spec is None or spec.loader is None:
        raise ImportError("MONAI is not installed (pip install monai)")
    package = importlib.util.module_from_spec(spec)
    sys.modules["monai"] = package
    try:
        # monai.utils (needed for the walk switch) reads monai.__version__ on import
        version = importlib.import_module("monai._version")
        package.__version__ = str(version.get_versions().get("version", "0+unknown"))
        walker = importlib.import_module("monai.utils.module")
        eager = walker.load_submodules
        walker.load_submodules = lambda *args, **kwargs: ([], [])
        try:
            spec.loader.exec_module(package)
        finally:
            walker.load_submodules = eager
        importlib.import_module("monai.apps")
    except BaseException:
        for name in [n for n in sys.modules if n == "monai" or n.startswith("monai.")]:
            del sys.modules[name]
        raise
