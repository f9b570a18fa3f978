"""DeepSeek-OCR's request options (also DeepSeek-OCR 2's): the view sizes and the crop mode.

The shared protocol hands a family its options as a mapping (the names its spec's ``options`` lists,
resolved from the settings and the request); DeepSeek-OCR reads them as :class:`VisionSettings`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from ...settings import default


@dataclass(frozen=True)
class VisionSettings:
    """``base_size``: the global view's side; ``image_size``: a tile's side in crop mode; ``crop_mode``:
    tiles + a global view (True) or one view (False)."""

    base_size: int = default("base_size")
    image_size: int = default("image_size")
    crop_mode: bool = default("crop_mode")

    @classmethod
    def of(cls, options: VisionSettings | Mapping[str, Any] | None) -> VisionSettings:
        """The options of a request (a mapping; names it lacks take the built-in defaults)."""
        if isinstance(options, VisionSettings):
            return options
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (options or {}).items() if k in names})
