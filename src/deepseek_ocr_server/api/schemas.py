"""Request bodies of the OpenAI-compatible endpoints (pydantic).

Unknown fields are accepted and ignored, as the OpenAI API tolerates client-specific extras
(Open WebUI, LangChain and others send some). Responses are built from the ``openai`` package's own
types in ``chat.py`` / ``responses.py``.

Range checks live here (400 with the field as ``param``); values are never clamped.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool

Temperature = Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)]
TopP = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]
PositiveInt = Annotated[int, Field(ge=1)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class DecodeFields(_Body):
    """Fields shared by both endpoints: OpenAI sampling options + this server's extensions."""

    temperature: Temperature | None = None
    top_p: TopP | None = None
    seed: int | None = None
    # extensions (send them as extra body fields, e.g. ``extra_body={...}`` in the openai SDK)
    do_sample: StrictBool | None = None
    top_k: PositiveInt | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0, le=10.0, allow_inf_nan=False)] | None = None
    no_repeat_ngram_size: Annotated[int, Field(ge=0, le=1024)] | None = None
    base_size: Annotated[int, Field(ge=64, le=4096)] | None = None
    image_size: Annotated[int, Field(ge=64, le=4096)] | None = None
    crop_mode: StrictBool | None = None


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
