"""Data layer: sample lists from data set layouts, robust image decoding, preprocessing, Dataset."""
from .dataset import ImageDataset, has_masks
from .image_io import DEFAULT_MAX_PIXELS, decode_image_bytes, read_image, read_mask
from .layouts import IMAGE_EXTS, LAYOUTS, load_split, read_btad, read_elpv, read_folder, read_mvtec, read_visa
from .samples import DataError, Sample, Split
from .transforms import IMAGENET_MEAN, IMAGENET_STD, Preprocess

__all__ = [
    "DEFAULT_MAX_PIXELS", "DataError", "IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_EXTS", "ImageDataset", "LAYOUTS",
    "Preprocess", "Sample", "Split", "decode_image_bytes", "has_masks", "load_split", "read_btad", "read_elpv",
    "read_folder", "read_image", "read_mask", "read_mvtec", "read_visa",
]
