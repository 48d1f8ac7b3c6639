"""Each hospital's images: synthetic, a MedMNIST file, or the hospital's own folder.

Every dataset yields ``(image, target)`` tuples: ``image`` float32
``[C, *task.image_size]``; ``target`` an int64 class index (classification)
or an int64 mask ``[1, *task.image_size]`` of class indices, 0 background
(segmentation). Data is held in memory as tensors; 3D volumes become 2D
slices, 3D patches or whole resized volumes (``data.volume_mode``).
"""

from __future__ import annotations

from common.data.errors import DataError
from common.data.site import SiteData, load_central_test, load_pooled, load_site, site_folders

__all__ = ["DataError", "SiteData", "load_central_test", "load_pooled", "load_site",
           "site_folders"]
