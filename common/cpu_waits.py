"""How idle OpenMP threads wait: passively, so a busy machine stays fair.

PyTorch's CPU kernels run on an OpenMP thread team. By default (GNU
OpenMP's ``OMP_WAIT_POLICY`` unset) a thread that finishes its share of an
operation spins, burning its core, until the rest of the team arrives. On an
idle machine that costs nothing; on a shared one (load above the core count)
a spinning thread steals the time slice its slower team-mate needs, and every
one of the thousands of operations per training step waits for the
descheduled thread. Measured on 2 cores at load ~12 (cnn, batch 64, one
training step): 1,472 ms with 2 spinning threads, 162 ms with 2 passive
threads, 125 ms with 1 thread. Flower's simulated hospitals run with one
thread each (Ray sets ``OMP_NUM_THREADS=1`` per one-CPU actor), so without
this the centralized baseline degraded ~x21 on a busy machine while the
federated run degraded ~x3.

The policy is read once, when PyTorch loads ``libgomp``: it must be in the
environment before ``import torch``. ``server`` and ``client`` set it when
their package is first imported, and every Flower process MedFed starts
(SuperLink, ServerApp, simulated hospitals, SuperNodes) inherits this
environment (:func:`common.processes.tool_env`). A value the user exported
is kept.
"""

from __future__ import annotations

import os

POLICY_VAR = "OMP_WAIT_POLICY"
PASSIVE = "PASSIVE"


def prefer_passive_waits() -> None:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` in this process' environment unless set."""
    os.environ.setdefault(POLICY_VAR, PASSIVE)
