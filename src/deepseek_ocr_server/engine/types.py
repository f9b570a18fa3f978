"""What the API layer hands to the engine, and what comes back. No torch here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from PIL import Image

from ..sampling import SamplingParams


@dataclass
class OcrRequest:
    """One generation request, all defaults already resolved (CLI > config > built-in, then body)."""

    model_id: str
    text: str  # user text; may contain the model's image placeholder ("<image>")
    images: list[Image.Image]
    #: the model family's request options (``models.base.RequestOptions``: ``base_size`` ... by name)
    options: dict[str, Any] = field(default_factory=dict)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_new_tokens: int = 512
    stop: list[str] = field(default_factory=list)
    system: str | None = None
    request_id: str = ""
    #: start of the answer to continue (the conversation ended with a partial assistant message)
    answer_prefix: str | None = None
    #: called (from the engine's thread) once the engine no longer needs ``images``: after
    #: preprocessing, or when the request ends without it; the engine drops ``images`` then
    release_images: Callable[[], None] | None = field(default=None, repr=False)


@dataclass
class TextDelta:
    text: str


@dataclass
class Finished:
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int
    completion_tokens: int
    text: str  # the whole generated text


@dataclass
class Failed:
    """Generation failed after it was accepted (the API turns it into an error body / error event)."""

    message: str
    status: int = 500
    type: str = "server_error"


Event = TextDelta | Finished | Failed
