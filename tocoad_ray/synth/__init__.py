"""Anomaly generator G (ToCoAD §3.1): Perlin/texture anomalies, CutPaste, NSA, contact sheets."""
from .base_image import as_rgb, is_gray, rotate_base
from .cutpaste import color_jitter, cutpaste
from .generator import GENERATORS, AnomalyGenerator
from .grid import grid_size, save_grid
from .nsa import nsa, poisson_blend
from .perlin import fractal_noise, perlin_mask, perlin_noise
from .perlin_anomaly import perlin_anomaly
from .textures import TextureSource, augment_texture, procedural_texture

__all__ = [
    "AnomalyGenerator", "GENERATORS", "TextureSource", "augment_texture", "procedural_texture",
    "perlin_noise", "fractal_noise", "perlin_mask", "perlin_anomaly", "cutpaste", "color_jitter",
    "nsa", "poisson_blend", "rotate_base", "as_rgb", "is_gray", "save_grid", "grid_size",
]
