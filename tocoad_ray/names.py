"""The names users type, in one place (light: the CLI builds its parser from these without
importing torch): methods, data layouts, scoring searches, and "did you mean" suggestions."""
from __future__ import annotations

import difflib
from collections.abc import Iterable

# tocoad is what the project is for: stage I (D on G's anomalies) + stage II (F fine-tuned), then
# the bank. patchcore = frozen F (the baseline); reconpatch = a trained projection of frozen F.
METHODS = ("tocoad", "patchcore", "reconpatch")
DEFAULT_METHOD = "tocoad"
LAYOUTS = ("mvtec", "visa", "btad", "folder", "elpv")
SEARCHES = ("ivf", "exact")
# the data root name for the solar-cell images packaged on PyPI (elpv-dataset); also the default
PACKAGED_DATA = "elpv"


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest choice, or "" when nothing is close."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
