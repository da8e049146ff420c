"""Texture source A for the anomaly generator G (ToCoAD §3.1, Fig. 3: texture sample A).

DTD images when a folder is given (DTD cannot be downloaded here); otherwise procedural textures
and/or other normal images. ``augment_texture`` applies 3 random DRAEM-style PIL augmentations.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from .perlin import fractal_noise

__all__ = ["TextureSource", "augment_texture", "procedural_texture", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def _list_images(root: str) -> list[str]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for f in sorted(filenames):
            if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."):
                files.append(os.path.join(dirpath, f))
    return sorted(files)


def _resize(arr: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    H, W = shape
    if arr.shape[:2] == (H, W):
        return arr
    return np.asarray(Image.fromarray(arr).resize((W, H), Image.BILINEAR))


def _to_rgb(arr: np.ndarray) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    elif arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.shape[2] == 4:
        arr = arr[..., :3]
    return np.ascontiguousarray(arr, dtype=np.uint8)


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=3).astype(np.float32)


def procedural_texture(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """One procedural texture (uint8 HxWx3): coloured fractal Perlin noise, stripes, checker,
    or a solid colour with noise, with random frequency/orientation/colours."""
    H, W = shape
    kind = int(rng.integers(4))
    if kind == 0:  # coloured fractal noise: a scalar field mapped through a random 3-colour palette
        r = (int(2 ** rng.integers(1, 5)), int(2 ** rng.integers(1, 5)))
        n = fractal_noise((H, W), rng, r, octaves=int(rng.integers(2, 5)))[..., None]
        c0, c1, c2 = _random_colour(rng), _random_colour(rng), _random_colour(rng)
        tex = np.where(n < 0.5, c0 + (c1 - c0) * (2 * n), c1 + (c2 - c1) * (2 * n - 1))
    elif kind in (1, 2):  # stripes (1) or checker (2), random period, orientation, colours
        yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
        theta = rng.uniform(0, np.pi)
        period = rng.uniform(4, max(6.0, min(H, W) / 3))
        u = (xx * np.cos(theta) + yy * np.sin(theta)) / period
        if kind == 1:
            soft = rng.random() < 0.5
            w = (0.5 + 0.5 * np.sin(2 * np.pi * u)) if soft else (np.floor(u * 2) % 2)
        else:
            v = (-xx * np.sin(theta) + yy * np.cos(theta)) / period
            w = (np.floor(u) + np.floor(v)) % 2
        c0, c1 = _random_colour(rng), _random_colour(rng)
        tex = c0 + (c1 - c0) * w[..., None]
        tex = tex + rng.normal(0, rng.uniform(0, 12), size=(H, W, 1))
    else:  # solid colour + per-pixel noise
        tex = _random_colour(rng)[None, None, :] + rng.normal(0, rng.uniform(2, 30), size=(H, W, 3))
    return np.clip(np.rint(tex), 0, 255).astype(np.uint8)


class TextureSource:
    """Samples texture images A (uint8 HxWx3) for G.

    ``texture_dir``: folder of texture images (DTD layout ``images/<class>/*.jpg`` or any image
    tree, searched recursively, sorted for determinism); when given, only those are used.
    Otherwise: ``images`` (other normal images, arrays) and/or ``procedural`` textures, chosen
    uniformly between the two kinds when both are enabled (``procedural`` defaults to on when
    no folder is given).
    """

    def __init__(self, texture_dir: str | None = None, images: Sequence[np.ndarray] | None = None,
                 procedural: bool | None = None, cache_size: int = 64):
        self.texture_dir = texture_dir
        self.files: list[str] = []
        if texture_dir is not None:
            self.files = _list_images(texture_dir)
            if not self.files:
                raise FileNotFoundError(f"no texture images under {texture_dir!r}")
        self.images = [_to_rgb(im) for im in images] if (images is not None and texture_dir is None) else []
        self.procedural = (texture_dir is None) if procedural is None else bool(procedural)
        if not (self.files or self.images or self.procedural):
            raise ValueError("TextureSource has no textures (no folder, no images, procedural off)")
        self.cache_size = int(cache_size)
        self._cache: OrderedDict = OrderedDict()

    def __len__(self) -> int:
        return len(self.files) + len(self.images)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_cache"] = OrderedDict()
        return state

    def _load(self, path: str, shape: tuple[int, int]) -> np.ndarray:
        key = (path, shape)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB").resize((shape[1], shape[0]), Image.BILINEAR))
        if self.cache_size > 0:
            self._cache[key] = arr
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return arr

    def sample(self, rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
        """A texture resized/generated at ``shape`` (H, W), uint8 HxWx3 (a fresh array)."""
        shape = (int(shape[0]), int(shape[1]))
        if self.files:
            return self._load(self.files[int(rng.integers(len(self.files)))], shape).copy()
        use_images = bool(self.images) and (not self.procedural or rng.random() < 0.5)
        if use_images:
            return _resize(self.images[int(rng.integers(len(self.images)))], shape).copy()
        return procedural_texture(rng, shape)


# --- augmentations (DRAEM's augmenter list, PIL versions) -------------------------------------

def _gamma(im, rng):
    g = rng.uniform(0.5, 2.0)
    lut = np.clip(np.rint(255.0 * (np.arange(256) / 255.0) ** g), 0, 255).astype(np.uint8)
    return im.point(list(lut) * 3)


def _brightness(im, rng):
    a = np.asarray(im, np.float32) * rng.uniform(0.8, 1.2) + rng.uniform(-30, 30)
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))


def _sharpness(im, rng):
    return ImageEnhance.Sharpness(im).enhance(rng.uniform(0.0, 2.0))


def _hue_saturation(im, rng):
    hsv = np.asarray(im.convert("HSV")).astype(np.int16)
    hsv[..., 0] = (hsv[..., 0] + int(rng.integers(-50, 51))) % 256
    hsv[..., 1] = np.clip(hsv[..., 1] + int(rng.integers(-50, 51)), 0, 255)
    return Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB")


def _solarize(im, rng):
    return ImageOps.solarize(im, threshold=int(rng.integers(32, 129)))


def _posterize(im, rng):
    return ImageOps.posterize(im, int(rng.integers(2, 7)))


def _invert(im, rng):
    return ImageOps.invert(im)


def _autocontrast(im, rng):
    return ImageOps.autocontrast(im)


def _equalize(im, rng):
    return ImageOps.equalize(im)


def _affine_rotate(im, rng):
    fill = tuple(int(v) for v in np.asarray(im).reshape(-1, 3).mean(0))
    return im.rotate(rng.uniform(-45, 45), resample=Image.BILINEAR, fillcolor=fill)


AUGMENTATIONS = (_gamma, _brightness, _sharpness, _hue_saturation, _solarize, _posterize,
                 _invert, _autocontrast, _equalize, _affine_rotate)


def augment_texture(tex: np.ndarray, rng: np.random.Generator, n: int = 3) -> np.ndarray:
    """Apply ``n`` (3) distinct random augmentations of {gamma, brightness, sharpness,
    hue/saturation, solarize, posterize, invert, autocontrast, equalize, affine rotate}."""
    im = Image.fromarray(_to_rgb(tex))
    for i in rng.choice(len(AUGMENTATIONS), size=n, replace=False):
        im = AUGMENTATIONS[int(i)](im, rng)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)
