"""What a replica keeps of each published version it serves: the object-store source the registry
sent with the request (never a path to re-read), bounded so old versions drop out."""
from __future__ import annotations

from typing import Any


def remember(sources: dict[str, Any], mid: str, value: Any, limit: int = 64) -> None:
    """``sources[mid] = value``, dropping the oldest entry past ``limit``."""
    sources[mid] = value
    if len(sources) > limit:
        sources.pop(next(iter(sources)))
