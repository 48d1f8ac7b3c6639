"""Importing this module imports MONAI, whole, before anything else of the process can.

Python does not make a package's first import safe from threads: a second
thread importing ``monai.networks`` while the first is still executing
``monai/__init__.py`` finds ``monai`` in ``sys.modules``, does not wait, and
imports ``monai.networks`` itself; MONAI's subpackages import each other in
cycles, so one of the two threads then fails with "cannot import name ...
from partially initialized module". Measured: eight threads released at once
on ``server.app``, ``client.app`` and six MONAI packages fail so with MONAI's
own import and with the lean one alike. Flower's simulation process is such a
case: it imports the ServerApp in one thread while its main thread loads the
ClientApp.

A module, by contrast, is imported once: a second thread importing it while
the first is executing it waits until it is complete. So ``server/app.py``
and ``client/app.py`` import this module first of all, and whichever thread
comes first imports MONAI here (the lean import of :mod:`common.monai_import`,
with every package MedFed uses) while the other waits.
"""

from __future__ import annotations

import importlib

from common.monai_import import IN_ORDER, lean_monai_imports

lean_monai_imports()
for _name in ("monai", *IN_ORDER):
    importlib.import_module(_name)
