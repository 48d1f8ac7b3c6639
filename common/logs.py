"""MedFed's logger: plain progress lines on stderr, one handler, no duplicates."""

from __future__ import annotations

import logging

LOGGER_NAME = "medfed"


def medfed_logger(level: int = logging.INFO) -> logging.Logger:
    """The ``medfed`` logger, with a plain ``%(message)s`` handler attached once.

    It does not propagate to the root logger (Opacus installs a root handler
    on import, which would print every line twice).
    """
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(level)
    logger.propagate = False
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    return logger
