"""The coordinating site: ServerApp, strategy, checkpoints, reports and the server command."""

from common.cpu_waits import prefer_passive_waits
from common.monai_import import lean_monai_imports

# Before any submodule imports torch (see common/cpu_waits.py)
prefer_passive_waits()
# Before any submodule imports MONAI (see common/monai_import.py)
lean_monai_imports()
