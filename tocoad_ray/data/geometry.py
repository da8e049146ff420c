"""Resize + centre-crop geometry shared by the torch preprocessing and the torch-free edge scorer."""
from __future__ import annotations


def resize_crop_geometry(h: int, w: int, image_size: int, crop: int, keep_aspect: bool) -> tuple[int, int, int, int]:
    """(resized_h, resized_w, crop_top, crop_left) for an h x w input resized to ``image_size``
    (squashed, or short side when ``keep_aspect``) then centre-cropped to ``crop``."""
    s = image_size
    if keep_aspect:
        # Same rounding as torchvision.transforms.Resize(int): long side truncated.
        if h <= w:
            rh, rw = s, max(s, int(s * w / h))
        else:
            rh, rw = max(s, int(s * h / w)), s
    else:
        rh, rw = s, s
    return rh, rw, int(round((rh - crop) / 2.0)), int(round((rw - crop) / 2.0))
