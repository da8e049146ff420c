"""Canonical digests of configurations and plans: the same content always gives the same string,
so a resumed run can tell whether a checkpoint or result belongs to the configuration it runs."""
from __future__ import annotations

import hashlib
import json
from typing import Any


def fingerprint(obj: Any) -> str:
    """Canonical JSON of ``obj`` (sorted keys; non-JSON values as ``str``)."""
    return json.dumps(obj, sort_keys=True, default=str)


def digest(obj: Any, length: int = 64) -> str:
    """sha256 hex digest of ``fingerprint(obj)``, cut to ``length`` characters."""
    return hashlib.sha256(fingerprint(obj).encode()).hexdigest()[:length]
