"""Client errors as JSON {"error": code, "detail": message} with the right 4xx status."""
from __future__ import annotations

from tocoad_ray.data import DataError


class ServeError(Exception):
    """An error to report to the client; ``code`` is a stable machine-readable name."""

    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers = status, code, detail, headers or {}

    def body(self) -> dict[str, str]:
        return {"error": self.code, "detail": self.detail}


def from_data_error(e: DataError) -> ServeError:
    """Map the image decoder's DataError to the status that says what is wrong."""
    msg = str(e)
    if msg == "empty image":
        return ServeError(400, "empty_body", "the request carried no image bytes")
    if "exceeds the limit" in msg or "decompression bomb" in msg:
        return ServeError(413, "image_too_large", msg)
    if "not a recognised image" in msg:
        return ServeError(415, "unsupported_media", f"{msg} (send PNG, JPEG, BMP or TIFF bytes)")
    return ServeError(400, "corrupt_image", msg)
