"""Reading one image file with MONAI's readers, chosen by extension.

PNG/JPEG and DICOM arrays keep the (row, column) order in which the image is
displayed, the same order as MedMNIST arrays, so a model trained on one
source sees the other the same way up (MONAI's defaults would transpose them).
NIfTI files keep their voxel axes.

:func:`load` does what MONAI's ``LoadImage(image_only=True,
ensure_channel_first=True)`` does with one given reader, without
``LoadImage``'s side effect of building every registered reader first (on
machines without a GPU its nvImageCodec DICOM reader logs a warning each time).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType

import numpy as np
import torch
from monai.data import MetaTensor, NibabelReader, PILReader, PydicomReader
from monai.data.image_reader import ImageReader
from monai.transforms import EnsureChannelFirst
from monai.transforms.io.array import switch_endianness
from monai.utils import ImageMetaKey, convert_to_tensor

from common.data.errors import INCOMPATIBLE, MISSING_FILE, UNREADABLE, DataError

READERS: Mapping[str, Callable[[], ImageReader]] = MappingProxyType({
    ".png": lambda: PILReader(reverse_indexing=False),
    ".jpg": lambda: PILReader(reverse_indexing=False),
    ".jpeg": lambda: PILReader(reverse_indexing=False),
    ".dcm": lambda: PydicomReader(swap_ij=False),
    ".dicom": lambda: PydicomReader(swap_ij=False),
    ".nii": NibabelReader,
    ".nii.gz": NibabelReader,
})
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
                        f"supported: {', '.join(sorted(READERS))}", kind=INCOMPATIBLE, file=path)


def load(path: Path) -> torch.Tensor:
    """Read ``path`` with its extension's MONAI reader: float32 ``[C, *spatial]``.

    The result is a MONAI ``MetaTensor`` carrying the file's affine, so MONAI's spatial transforms
    (``Orientation``, ``Spacing``) apply to it.

    Raises:
        DataError: missing file, unknown extension, or a file the reader
            cannot decode (the file is named).
    """
    if not path.is_file():
        raise DataError(f"image file {path} not found", kind=MISSING_FILE, file=path)
    check_extension(path)
    reader = READERS[suffix(path)]()
    try:
        array, meta = reader.get_data(reader.read(str(path)))
        native = np.asarray(array, dtype=np.float32)  # also fixes big-endian NIfTI data
        meta = switch_endianness(meta, "<")
        meta[ImageMetaKey.FILENAME_OR_OBJ] = str(path)
        image = MetaTensor.ensure_torch_and_prune_meta(native, meta)
        return EnsureChannelFirst()(image, meta_dict=meta)
    except Exception as err:  # noqa: BLE001 - every reader failure means the same to the user
        raise DataError(f"cannot read image {path}: {_first_line(err)}", kind=UNREADABLE,
                        file=path) from None


def _first_line(err: Exception) -> str:
    """The first line of a reader's error (at most 200 characters), or its type's name."""
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


def read_image(path: Path) -> torch.Tensor:
    """Load ``path`` as a plain float32 tensor ``[C, *spatial]`` in file units.

    Raises:
        DataError: as :func:`load`.
    """
    return convert_to_tensor(load(path), dtype=torch.float32, track_meta=False)
