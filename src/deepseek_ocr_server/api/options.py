"""Server-side API options (limits, auth, CORS), read once from the settings object.

The foundation's ``Settings.server`` carries the operator's choices; a key it does not define falls back
to the default below, so the api layer also runs with ``settings=None`` (unit tests, the skeleton).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from ..config import ServerSettings

MiB = 1024 * 1024


#: ApiOptions field -> ServerSettings attribute, where the names differ
_SETTING_NAMES = {
    "max_images": "max_images_per_request",
    "max_image_bytes": "image_fetch_max_bytes",
    "image_fetch_timeout": "image_fetch_timeout_s",
}


@dataclass(frozen=True)
class ApiOptions:
    api_key: str | None = None
    cors_origins: list[str] = field(default_factory=lambda: ["*"])
    allow_private_image_urls: bool = False
    #: request body cap (JSON with base64 images); larger bodies get 413
    max_body_bytes: int = 32 * MiB
    #: images per request
    max_images: int = 8
    #: encoded size of one image (data: URL after base64 decoding, or downloaded bytes)
    max_image_bytes: int = 20 * MiB
    #: decoded pixels of one image (decompression-bomb guard)
    max_image_pixels: int = 64_000_000
    #: whole download of one image URL, redirects included (seconds)
    image_fetch_timeout: float = 10.0
    max_redirects: int = 3
    #: decoded image pixels held by all requests in flight (decoded, not yet preprocessed by the engine)
    max_pixels_in_flight: int = 256_000_000
    #: a request body not received within this many seconds gets 408
    body_timeout_s: float = 60.0
    #: characters of text per request (system + user text + a partial answer), checked before tokenizing
    max_prompt_chars: int = 32768
    #: PDF render resolution when a request names none, and pages per document request
    pdf_dpi: int = ServerSettings.pdf_dpi
    max_pages: int = ServerSettings.max_pages

    @classmethod
    def from_settings(cls, settings: Any) -> ApiOptions:
        server = getattr(settings, "server", None)
        if server is None:
            return cls()
        values: dict[str, Any] = {}
        for f in fields(cls):
            v = getattr(server, _SETTING_NAMES.get(f.name, f.name), None)
            if v is not None:
                values[f.name] = list(v) if f.name == "cors_origins" else v
        if values.get("api_key") == "":
            values["api_key"] = None
        return cls(**values)
