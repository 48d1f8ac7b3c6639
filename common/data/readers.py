"""Reading one image file with MONAI's readers, chosen by extension."""

from __future__ import annotations

from pathlib import Path

import torch
from monai.data import NibabelReader, PILReader, PydicomReader
from monai.data.image_reader import ImageReader
from monai.transforms import LoadImage

from common.data.errors import DataError

READERS: dict[str, type[ImageReader]] = {
    ".png": PILReader, ".jpg": PILReader, ".jpeg": PILReader,
    ".dcm": PydicomReader, ".dicom": PydicomReader,
    ".nii": NibabelReader, ".nii.gz": NibabelReader,
}


def suffix(path: Path) -> str:
    """The image extension of ``path`` (``.nii.gz`` counts as one)."""
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def is_image(path: Path) -> bool:
    """Whether ``path`` has an extension MedFed reads."""
    return suffix(path) in READERS


def read_image(path: Path) -> torch.Tensor:
    """Load ``path`` channel-first as float32: ``[C, *spatial]`` in file units.

    Raises:
        DataError: missing file, unknown extension, or a file the reader
            cannot decode (the file is named).
    """
    if not path.is_file():
        raise DataError(f"image file {path} not found")
    reader = READERS.get(suffix(path))
    if reader is None:
        raise DataError(f"{path}: unknown image extension {suffix(path)!r}; "
                        f"supported: {', '.join(sorted(READERS))}")
    loader = LoadImage(reader=reader(), image_only=True, ensure_channel_first=True,
                       dtype="float32")
    try:
        image = loader(str(path))
    except Exception as err:  # noqa: BLE001 - every reader failure means the same to the user
        raise DataError(f"cannot read image {path}: {str(err).splitlines()[0][:200]}") from None
    return torch.as_tensor(image).float()
