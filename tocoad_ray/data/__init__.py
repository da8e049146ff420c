"""Data layer: sample lists from data set layouts, robust image decoding, preprocessing, Dataset.

``ImageDataset``/``Preprocess`` (torch) load on first use, so decoding images and reading layouts
(numpy + PIL) stay importable without torch: the edge scorer (``tocoad_ray.export.runtime``) needs that.
"""
from .image_io import DEFAULT_MAX_PIXELS, decode_image_bytes, read_image, read_mask
from .layouts import IMAGE_EXTS, LAYOUTS, list_categories, load_split, read_btad, read_elpv, read_folder, read_mvtec, read_visa
from .samples import DataError, Sample, Split

_TORCH = {"ImageDataset": "dataset", "has_masks": "dataset", "IMAGENET_MEAN": "transforms",
          "IMAGENET_STD": "transforms", "Preprocess": "transforms"}


def __getattr__(name: str):
    if name in _TORCH:
        import importlib

        return getattr(importlib.import_module(f".{_TORCH[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_MAX_PIXELS", "DataError", "IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_EXTS", "ImageDataset", "LAYOUTS", "list_categories",
    "Preprocess", "Sample", "Split", "decode_image_bytes", "has_masks", "load_split", "read_btad", "read_elpv",
    "read_folder", "read_image", "read_mask", "read_mvtec", "read_visa",
]
