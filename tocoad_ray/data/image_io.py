"""Decode images and masks from files or bytes into fixed numpy formats, with errors that name the file.

Every image comes out as ``uint8 HxWx3 RGB`` whatever its storage mode, so the rest of the
pipeline never branches on grayscale / 16-bit / alpha inputs.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image

from .samples import DataError

# 100 MPix (e.g. 10000x10000) is far above any inspection camera frame yet keeps a crafted
# "decompression bomb" from allocating gigabytes. PIL warns above this and errors above twice it.
DEFAULT_MAX_PIXELS = 100_000_000
Image.MAX_IMAGE_PIXELS = DEFAULT_MAX_PIXELS

_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


def _open(src: str | Path | IO[bytes], name: str, max_pixels: int | None) -> Image.Image:
    """Open and fully decode ``src``; every failure becomes a DataError naming ``name``."""
    limit = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    try:
        # The bomb warning is raised inside Image.open; make it an error so it cannot slip by. (The
        # explicit pixel check below is the real guard; catch_warnings is only advisory across threads.)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(src)
            w, h = img.size
            if w * h > limit:
                raise DataError(f"{name}: image of {w}x{h} pixels exceeds the limit of {limit} pixels")
            img.load()  # Image.open is lazy: truncated / corrupt pixel data only shows up here
    except DataError:
        raise
    except FileNotFoundError as e:
        raise DataError(f"image file not found: {name}") from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(f"{name}: image too large (decompression bomb guard): {e}") from e
    except Image.UnidentifiedImageError as e:
        raise DataError(f"{name}: not a recognised image file") from e
    except MemoryError:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ... for bad data
        raise DataError(f"{name}: cannot decode image ({type(e).__name__}: {e})") from e
    return img


def _to_rgb(img: Image.Image) -> np.ndarray:
    """Any PIL mode -> uint8 HxWx3."""
    mode = img.mode
    if mode in _SIXTEEN_BIT:
        # Fixed 65535 -> 255 scaling (not per-image min/max) so brightness stays comparable across images.
        a = np.asarray(img).astype(np.float32)
        a = np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(a[..., None], 3, axis=2)
    if mode == "F":
        a = np.asarray(img).astype(np.float32)
        a = a * 255.0 if a.size and np.nanmax(a) <= 1.0 else a  # float images are usually in [0, 1]
        a = np.clip(np.nan_to_num(np.rint(a)), 0, 255).astype(np.uint8)
        return np.repeat(a[..., None], 3, axis=2)
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode == "PA":
        img = img.convert("RGBA")
    elif mode == "1":
        img = img.convert("L")
    if img.mode in ("RGBA", "LA", "La", "RGBa"):
        # Composite on black: transparent regions are background, not whatever colour is hidden under them.
        rgba = np.asarray(img.convert("RGBA")).astype(np.float32)
        rgb = rgba[..., :3] * (rgba[..., 3:4] / 255.0)
        return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    if img.mode != "RGB":
        img = img.convert("RGB")  # L, CMYK, YCbCr, LAB, HSV
    return np.array(img, dtype=np.uint8)  # a writable copy (np.asarray of a PIL image is read-only)


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as uint8 HxWx3 RGB. EXIF orientation is ignored on purpose: masks are
    drawn on the stored pixel grid, and rotating only the image would misalign them."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image file not found: {path}")
    with _open(path, str(path), None) as img:
        return _to_rgb(img)


def decode_image_bytes(data: bytes, max_pixels: int | None = None) -> np.ndarray:
    """Decode an uploaded image (bytes) as uint8 HxWx3 RGB; ``max_pixels`` caps width*height."""
    if not data:
        raise DataError("empty image")
    with _open(io.BytesIO(data), "uploaded image", max_pixels) as img:
        return _to_rgb(img)


def read_mask(path: str | Path) -> np.ndarray:
    """Read a ground-truth mask as bool HxW (nonzero = defect; JPEG masks thresholded at 128
    because compression noise would otherwise turn edges into defects)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"mask file not found: {path}")
    with _open(path, str(path), None) as img:
        if img.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
            img = img.convert("RGB")
        elif img.mode in ("LA", "La"):
            img = img.getchannel(0)
        elif img.mode in ("RGBA", "RGBa"):
            img = img.convert("RGB")
        a = np.asarray(img)
    if a.ndim == 3:
        a = a.max(axis=2)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        return a >= 128
    return a != 0
