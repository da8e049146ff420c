"""Registry of anomaly generators G and the ``AnomalyGenerator`` callable used to build the
pseudo-anomaly set T_G = G(I_i) (ToCoAD eq. 1)."""
from __future__ import annotations

from functools import partial
from typing import Callable, Sequence

import numpy as np

from .cutpaste import cutpaste
from .nsa import nsa
from .perlin_anomaly import perlin_anomaly
from .textures import TextureSource

__all__ = ["GENERATORS", "AnomalyGenerator"]

#: name -> function(image, rng, normal_prob=..., rotate=..., return_base=..., **kw)
GENERATORS: dict[str, Callable] = {
    "perlin": perlin_anomaly,
    "cutpaste": partial(cutpaste, variant="normal"),
    "cutpaste_scar": partial(cutpaste, variant="scar"),
    "nsa": nsa,
}


class AnomalyGenerator:
    """G: ``gen(image uint8 HxWx3, rng) -> (I_G uint8 HxWx3, y_G bool HxW)``.

    ``kind`` selects from ``GENERATORS``. ``rotate`` (default True for every kind) applies
    ToCoAD's base rotation I -> I_R before the anomaly is made; the mask refers to I_R.
    ``texture_dir``/``other_images`` feed the Perlin texture source A (folder first, else
    procedural textures + other images); ``other_images`` are NSA's patch sources. Extra ``kw``
    go to the generator function. About ``normal_prob`` of the outputs are normal (y_G all
    False). Deterministic for a given rng state; picklable.
    """

    def __init__(self, kind: str = "perlin", texture_dir: str | None = None, normal_prob: float = 0.5,
                 other_images: Sequence[np.ndarray] | None = None, rotate: bool = True, **kw):
        if kind not in GENERATORS:
            raise ValueError(f"unknown generator {kind!r}; choose from {sorted(GENERATORS)}")
        self.kind = kind
        self.normal_prob = float(normal_prob)
        self.rotate = bool(rotate)
        self.kw = dict(kw)
        if kind == "perlin":
            self.kw.setdefault("textures", TextureSource(texture_dir, images=other_images))
        elif kind == "nsa" and other_images is not None:
            self.kw.setdefault("sources", list(other_images))

    @classmethod
    def from_config(cls, g) -> "AnomalyGenerator":
        """G as a ``GeneratorConfig`` (``cfg.generator``) sets it."""
        return cls(g.kind, texture_dir=g.texture_dir, normal_prob=g.normal_prob, rotate=g.rotate)

    def generate(self, image: np.ndarray, rng: np.random.Generator):
        """(I_G, y_G, I_R): also returns the rotated base the mask refers to."""
        return GENERATORS[self.kind](image, rng, normal_prob=self.normal_prob, rotate=self.rotate,
                                     return_base=True, **self.kw)

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        out, mask, _ = self.generate(image, rng)
        return out, mask

    def __repr__(self) -> str:
        return f"AnomalyGenerator(kind={self.kind!r}, normal_prob={self.normal_prob}, rotate={self.rotate})"
