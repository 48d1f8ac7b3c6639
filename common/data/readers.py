"""Reading one image file with MONAI's readers, chosen by extension.

PNG/JPEG and DICOM arrays keep the (row, column) order in which the image is
displayed, the same order as MedMNIST arrays, so a model trained on one
source sees the other the same way up (MONAI's defaults would transpose them).
NIfTI files keep their voxel axes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor, NibabelReader, PILReader, PydicomReader
from monai.data.image_reader import ImageReader
from monai.transforms import EnsureChannelFirst
from monai.utils import convert_to_tensor

from common.data.errors import DataError

READERS: dict[str, Callable[[], ImageReader]] = {
    ".png": lambda: PILReader(reverse_indexing=False),
    ".jpg": lambda: PILReader(reverse_indexing=False),
    ".jpeg": lambda: PILReader(reverse_indexing=False),
    ".dcm": lambda: PydicomReader(swap_ij=False),
    ".dicom": lambda: PydicomReader(swap_ij=False),
    ".nii": NibabelReader,
    ".nii.gz": NibabelReader,
}
"""Image extensions MedFed reads, and the MONAI reader of each."""


def suffix(path: Path) -> str:
    """The image extension of ``path`` in lower case (``.nii.gz`` counts as one)."""
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def is_image(path: Path) -> bool:
    """Whether ``path`` has an extension MedFed reads."""
    return suffix(path) in READERS


def check_extension(path: Path) -> None:
    """Raise :class:`DataError` naming ``path`` if its extension is not readable."""
    if not is_image(path):
        raise DataError(f"{path}: unknown image extension {suffix(path)!r}; "
                        f"supported: {', '.join(sorted(READERS))}")


def read_image(path: Path) -> torch.Tensor:
    """Load ``path`` channel-first as float32: ``[C, *spatial]`` in file units.

    Raises:
        DataError: missing file, unknown extension, or a file the reader
            cannot decode (the file is named).
    """
    if not path.is_file():
        raise DataError(f"image file {path} not found")
    check_extension(path)
    reader = READERS[suffix(path)]()
    try:
        array, meta = reader.get_data(reader.read(str(path)))
        native = np.asarray(array, dtype=np.float32)  # also fixes big-endian NIfTI data
        image = EnsureChannelFirst()(MetaTensor(native, meta=meta))
    except Exception as err:  # noqa: BLE001 - every reader failure means the same to the user
        raise DataError(f"cannot read image {path}: {str(err).splitlines()[0][:200]}") from None
    return convert_to_tensor(image, dtype=torch.float32, track_meta=False)
