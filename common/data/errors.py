"""The error every data reader raises for bad input."""

from __future__ import annotations


class DataError(ValueError):
    """Input data is missing, unreadable or inconsistent; the message names the file or key."""
