"""The error every data reader raises for bad input, and the kinds of data problem."""

from __future__ import annotations

from pathlib import Path

UNREADABLE = "unreadable"
"""A file a reader cannot decode (truncated, corrupt, wrong format inside)."""
MISSING_FILE = "missing-file"
"""A file that is listed or expected (an image in labels.csv, a mask) but absent."""
MISSING_LABEL = "missing-label"
"""An image without a label: an empty label cell, or not listed in labels.csv."""
NOT_INTEGER = "non-integer-label"
"""A label that is not an integer class."""
OUT_OF_RANGE = "label-out-of-range"
"""A label or mask value outside ``[0, task.num_classes)``."""
SHAPE_MISMATCH = "shape-mismatch"
"""A mask whose grid differs from its image's."""
INCOMPATIBLE = "incompatible"
"""An image the task cannot take (spatial dims, channels, extension)."""
DUPLICATE = "duplicate"
"""An image listed twice, or two files with the same pixels."""
LAYOUT = "layout"
"""A missing folder, CSV, column or sub-folder; a folder with no images."""
CLASS_ABSENT = "class-absent"
"""A class with no sample in the data or in one split."""
SPLIT_TOO_SMALL = "split-too-small"
"""A validation or test split too small for its metrics to mean anything."""
SPLIT = "split"
"""A division into hospitals or splits that cannot be made (too few samples)."""


class DataError(ValueError):
    """Input data is missing, unreadable or inconsistent; the message names the file or key.

    Attributes:
        kind: what is wrong, one of the kinds above (``data`` when unclassified).
        file: the file at fault, if one is.
        row: its line in ``labels.csv`` (the header is line 1), if it has one.
    """

    def __init__(self, message: str, *, kind: str = "data", file: Path | None = None,
                 row: int | None = None) -> None:
        super().__init__(message)
        self.kind, self.file, self.row = kind, file, row
