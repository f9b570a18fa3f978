"""Request bodies of the OpenAI-compatible endpoints (pydantic).

Unknown fields are accepted and ignored, as the OpenAI API tolerates client-specific extras
(Open WebUI, LangChain and others send some). Responses are built from the ``openai`` package's own
types in ``chat.py`` / ``responses.py``.

Range checks live here (400 with the field as ``param``); values are never clamped.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError

from ..config import PDF_DPI_RANGE
from .errors import ApiError, validation_error

Temperature = Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)]
TopP = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]
PositiveInt = Annotated[int, Field(ge=1)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class DecodeFields(_Body):
    """Fields shared by both endpoints: OpenAI sampling options + this server's extensions."""

    temperature: Temperature | None = None
    top_p: TopP | None = None
    seed: Annotated[int, Field(ge=-(2**63), le=2**64 - 1)] | None = None  # torch.Generator's range
    # extensions (send them as extra body fields, e.g. ``extra_body={...}`` in the openai SDK)
    do_sample: StrictBool | None = None
    top_k: PositiveInt | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0, le=10.0, allow_inf_nan=False)] | None = None
    no_repeat_ngram_size: Annotated[int, Field(ge=0, le=1024)] | None = None
    base_size: Annotated[int, Field(ge=64, le=4096)] | None = None
    image_size: Annotated[int, Field(ge=64, le=4096)] | None = None
    crop_mode: StrictBool | None = None
    # documents and output (api/documents.py): page selection "1-3,7", PDF render resolution, what the
    # answer holds (clean markdown, the model's raw text, or markdown + the structured "document" field),
    # boxes-drawn page pictures in the "document" field
    pages: Annotated[str, Field(max_length=1000)] | None = None
    dpi: Annotated[int, Field(ge=PDF_DPI_RANGE[0], le=PDF_DPI_RANGE[1])] | None = None
    output_format: Literal["markdown", "raw", "blocks"] | None = None
    layout_images: StrictBool | None = None


# --- chat completions ------------------------------------------------------------------------------


class ChatMessage(_Body):
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class StreamOptions(_Body):
    include_usage: StrictBool | None = None


class ChatCompletionRequest(DecodeFields):
    model: str
    messages: list[ChatMessage]
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: PositiveInt | None = None
    max_completion_tokens: PositiveInt | None = None
    stop: str | list[str] | None = None
    n: Annotated[int, Field(ge=1, le=1)] | None = None
    user: str | None = None


# --- responses -------------------------------------------------------------------------------------


class ResponsesInputMessage(_Body):
    role: str
    type: Literal["message"] | None = None
    content: str | list[dict[str, Any]] | None = None


class ResponsesRequest(DecodeFields):
    model: str
    input: str | list[ResponsesInputMessage]
    instructions: str | None = None
    max_output_tokens: PositiveInt | None = None
    stream: StrictBool | None = False
    store: bool | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None


B = TypeVar("B", bound=BaseModel)


def parse_body(raw: bytes, model: type[B]) -> B:
    """JSON body -> request model, whatever the Content-Type (curl -d sends a form type by default).

    Every failure is a 400 with an OpenAI error body naming the offending field."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        reason = "the body is empty" if not raw.strip() else str(exc)
        raise ApiError(f"We could not parse the JSON body of your request: {reason}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError("The request body must be a JSON object.", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc.errors()) from None
