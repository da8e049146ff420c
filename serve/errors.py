"""Errors as clients see them: JSON ``{"error": code, "detail": message, "request_id": id}``.

A message says what the client can do about it and never carries internals (server paths,
tracebacks, pids, IPs, actor ids): the full story goes to the server log under the same request
id. Load failures are reduced to a *kind* (``load_failure_kind``) for the public listings.
"""
from __future__ import annotations

import re

from tocoad_ray.data import DataError


class ServeError(Exception):
    """An error to report to the client; ``code`` is a stable machine-readable name."""

    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers = status, code, detail, headers or {}

    def body(self, request_id: str) -> dict[str, str]:
        return {"error": self.code, "detail": self.detail, "request_id": request_id}


class ClientGone(Exception):
    """The client closed the connection before its request body arrived."""


def from_data_error(e: DataError, max_pixels: int) -> ServeError:
    """Map the image decoder's DataError to the status that says what is wrong (no file names:
    the decoder names its input ``<upload>``)."""
    msg = str(e)
    if msg.endswith("empty image"):
        return ServeError(400, "empty_body", "the request carried no image bytes")
    if "exceeds the limit" in msg or "decompression bomb" in msg.lower():
        size = re.search(r"(\d+)x(\d+) pixels", msg)
        what = f"an image of {size.group(1)}x{size.group(2)} pixels" if size else "the image"
        return ServeError(413, "image_too_large",
                          f"{what} exceeds this service's limit of {max_pixels:,} pixels (max_pixels); send a smaller image")
    if "not a recognised image" in msg:
        return ServeError(415, "unsupported_media", "the body is not a recognised image; send PNG, JPEG, BMP or TIFF bytes")
    return ServeError(400, "corrupt_image", "the image is truncated or corrupt and cannot be decoded")


# kind -> what an operator should do; matched on the exception text, first hit wins
_KINDS = (
    ("corrupt_artifact", ("sha256 mismatch", "is corrupted", "corrupt"),
     "an artifact file failed its checksum: copy the artifact again"),
    ("missing_artifact_files", ("file missing", "not found", "no such file", "meta.json is missing"),
     "artifact files are missing: copy the complete artifact (meta.json last)"),
    ("backbone_weights_mismatch", ("weights sha256", "backbone weights"),
     "the backbone weights differ from the ones the bank was built with"),
    ("invalid_artifact", ("unknown artifact format", "holds no", "dims, metadata says", "not an artifact"),
     "the artifact is not one this service can read: refit it with this version"),
    ("load_timeout", ("timeout", "timed out"), "loading took too long; it is retried on the next poll"),
)


def load_failure_kind(e: BaseException | str) -> tuple[str, str]:
    """(kind, public message) of a product load failure, without any path or trace."""
    text = str(e).lower()
    for kind, needles, message in _KINDS:
        if any(n in text for n in needles):
            return kind, message
    if isinstance(e, TimeoutError):
        return "load_timeout", _KINDS[-1][2]
    return "load_failed", "the product could not be loaded; the server log has the details"
