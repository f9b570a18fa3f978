"""Request bodies of the OpenAI-compatible endpoints (pydantic).

Unknown fields are accepted and ignored, as the OpenAI API tolerates client-specific extras
(Open WebUI, LangChain and others send some). Responses are built from the ``openai`` package's own
types in ``chat.py`` / ``responses.py``.

Range checks live here (400 with the field as ``param``); values are never clamped. The bounds of the
fields that are also settings (``temperature``, ``base_size``, ``seed``, ``dpi`` ...) come from the
settings table (``settings.py``), the same ones the config file and the flags are checked against.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, ValidationError

from ..settings import SETTINGS
from .errors import ApiError, validation_error

# Strict types: "10" or true for a number is refused (as the OpenAI API does), never coerced.
Number = StrictFloat | StrictInt
PositiveInt = Annotated[StrictInt, Field(ge=1)]


def _setting(name: str) -> Any:
    """The request field type of a setting: strict, with the setting's range."""
    s = SETTINGS[name]
    if s.kind == "bool":
        return StrictBool
    return Annotated[StrictInt if s.kind == "int" else Number, Field(**s.field_bounds())]


Temperature = _setting("temperature")
TopP = _setting("top_p")
TopK = _setting("top_k")
Seed = _setting("seed")
RepetitionPenalty = _setting("repetition_penalty")
NoRepeatNgramSize = _setting("no_repeat_ngram_size")
ViewSize = _setting("base_size")
TileSize = _setting("image_size")
Dpi = _setting("pdf_dpi")


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class DecodeFields(_Body):
    """Fields shared by both endpoints: OpenAI sampling options + this server's extensions."""

    temperature: Temperature | None = None
    top_p: TopP | None = None
    seed: Seed | None = None
    # extensions (send them as extra body fields, e.g. ``extra_body={...}`` in the openai SDK)
    do_sample: StrictBool | None = None
    top_k: TopK | None = None
    repetition_penalty: RepetitionPenalty | None = None
    no_repeat_ngram_size: NoRepeatNgramSize | None = None
    base_size: ViewSize | None = None
    image_size: TileSize | None = None
    crop_mode: StrictBool | None = None
    # documents and output (api/documents.py): page selection "1-3,7", PDF render resolution, what the
    # answer holds (clean markdown, the model's raw text, or markdown + the structured "document" field),
    # boxes-drawn page pictures in the "document" field
    pages: Annotated[str, Field(max_length=1000)] | None = None
    dpi: Dpi | None = None
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
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: PositiveInt | None = None
    max_completion_tokens: PositiveInt | None = None
    stop: str | list[str] | None = None
    n: Annotated[StrictInt, Field(ge=1, le=1)] | None = None
    user: str | None = None
    # accepted for compatibility, but only their "off" values: a client relying on them would get
    # something else than it asked for (see ``refuse_unsupported``)
    response_format: dict[str, Any] | None = None
    logprobs: StrictBool | None = None
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None


# --- responses -------------------------------------------------------------------------------------


class ResponsesInputMessage(_Body):
    role: str
    type: Literal["message"] | None = None
    content: str | list[dict[str, Any]] | None = None


class ResponsesRequest(DecodeFields):
    model: str
    input: str | Annotated[list[ResponsesInputMessage], Field(min_length=1)]
    instructions: str | None = None
    max_output_tokens: PositiveInt | None = None
    stream: StrictBool | None = False
    store: bool | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    text: dict[str, Any] | None = None  # only {"format": {"type": "text"}} (see ``refuse_unsupported``)
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None


def _unsupported(param: str, what: str) -> ApiError:
    return ApiError(f"'{param}' is not supported by this server: {what}", param=param, code="unsupported_parameter")


def refuse_unsupported(body: ChatCompletionRequest | ResponsesRequest) -> None:
    """400 for OpenAI options a client relies on for correctness that an OCR model cannot honour
    (structured output, log probabilities). Other unknown fields (``tools``, ``user``, ...) are
    accepted and ignored, as the README lists."""
    if isinstance(body, ChatCompletionRequest):
        rf = body.response_format
        if rf is not None and rf.get("type", "text") != "text":
            raise _unsupported("response_format", "the model answers plain text only (type 'text')")
        if body.logprobs:
            raise _unsupported("logprobs", "log probabilities are not returned")
    else:
        fmt = (body.text or {}).get("format")
        if isinstance(fmt, dict) and fmt.get("type", "text") != "text":
            raise _unsupported("text.format", "the model answers plain text only (type 'text')")
    if body.top_logprobs:
        raise _unsupported("top_logprobs", "log probabilities are not returned")


B = TypeVar("B", bound=BaseModel)

#: deepest JSON nesting a request body may have (a chat body needs about 6 levels)
MAX_JSON_DEPTH = 32


def _check_tree(data: object) -> None:
    """Reject what JSON allows but nothing downstream can use: nesting beyond ``MAX_JSON_DEPTH`` and
    strings with lone UTF-16 surrogates (``"\\ud800"``: no UTF-8 encoder or tokenizer accepts them).
    Iterative, so that hostile nesting cannot exhaust the interpreter's stack."""
    stack: list[tuple[object, str, int]] = [(data, "", 0)]
    while stack:
        node, where, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ApiError(f"The JSON body is nested more than {MAX_JSON_DEPTH} levels deep.", code="invalid_json")
        if isinstance(node, str):
            _check_text(node, where)
        elif isinstance(node, dict):
            for k, v in node.items():
                _check_text(k, where)
                stack.append((v, f"{where}.{k}" if where else k, depth + 1))
        elif isinstance(node, list):
            stack.extend((v, f"{where}[{i}]", depth + 1) for i, v in enumerate(node))


def _check_text(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(
            "The request contains text that is not valid Unicode (an unpaired surrogate escape such as \\ud800).",
            param=where or None,
            code="invalid_value",
        ) from None


def parse_body(raw: bytes, model: type[B]) -> B:
    """JSON body -> request model, whatever the Content-Type (curl -d sends a form type by default).

    Every failure is a 400 with an OpenAI error body naming the offending field."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        reason = "the body is empty" if not raw.strip() else str(exc)
        raise ApiError(f"We could not parse the JSON body of your request: {reason}", code="invalid_json") from None
    except RecursionError:
        raise ApiError(f"The JSON body is nested more than {MAX_JSON_DEPTH} levels deep.", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError("The request body must be a JSON object.", code="invalid_json")
    _check_tree(data)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc.errors()) from None
