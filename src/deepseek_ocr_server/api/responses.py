"""Responses API wire format, built from the ``openai`` package's types.

Stream event sequence (each with a increasing ``sequence_number``), as the SDK's ``responses.stream()``
helper validates it:

    response.created -> response.in_progress -> response.output_item.added -> response.content_part.added
    -> response.output_text.delta ... -> response.output_text.done -> response.content_part.done
    -> response.output_item.done -> response.completed | response.incomplete

A budget cut gives status ``incomplete`` with ``incomplete_details.reason == "max_output_tokens"``.
An error after the stream started is an ``error`` event, followed by ``response.failed``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from openai.types.responses import (
    Response,
    ResponseCompletedEvent,
    ResponseContentPartAddedEvent,
    ResponseContentPartDoneEvent,
    ResponseCreatedEvent,
    ResponseErrorEvent,
    ResponseFailedEvent,
    ResponseIncompleteEvent,
    ResponseInProgressEvent,
    ResponseOutputItemAddedEvent,
    ResponseOutputItemDoneEvent,
    ResponseTextDeltaEvent,
    ResponseTextDoneEvent,
)

from ..engine.types import Failed, Finished, TextDelta
from . import sse
from .errors import ApiError, as_api_error
from .schemas import ResponsesRequest
from .service import Generation, failed_error


class ResponseBuilder:
    """Holds the ids and echoed request fields of one response."""

    def __init__(self, rid: str, model: str, body: ResponsesRequest, sampling_temperature: float, top_p: float) -> None:
        self.rid = rid
        self.msg_id = "msg_" + uuid.uuid4().hex
        self.model = model
        self.created_at = int(time.time())
        self.body = body
        self.temperature = sampling_temperature
        self.top_p = top_p

    def message(self, text: str | None, status: str) -> dict[str, Any]:
        content = [] if text is None else [self.part(text)]
        return {"id": self.msg_id, "type": "message", "role": "assistant", "status": status, "content": content}

    @staticmethod
    def part(text: str) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def response(
        self,
        status: str,
        text: str | None = None,
        fin: Finished | None = None,
        error: ApiError | None = None,
    ) -> Response:
        fields: dict[str, Any] = {
            "id": self.rid,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "model": self.model,
            "output": [],
            "instructions": self.body.instructions,
            "max_output_tokens": self.body.max_output_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "parallel_tool_calls": False,
            "tool_choice": "auto",
            "tools": [],
            "text": {"format": {"type": "text"}},
            "truncation": "disabled",
            "metadata": self.body.metadata or {},
            "incomplete_details": None,
            "error": None,
            "usage": None,
        }
        if fin is not None:
            done = "incomplete" if fin.finish_reason == "length" else "completed"
            fields["output"] = [self.message(text if text is not None else fin.text, done)]
            fields["usage"] = {
                "input_tokens": fin.prompt_tokens,
                "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                "output_tokens": fin.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": fin.prompt_tokens + fin.completion_tokens,
            }
            if done == "incomplete":
                fields["incomplete_details"] = {"reason": "max_output_tokens"}
            fields["completed_at"] = int(time.time())
            if (document := getattr(fin, "document", None)) is not None:
                fields["document"] = document  # the structured result (output_format "blocks"), an extra field
        if error is not None:
            fields["error"] = {"code": "server_error", "message": error.message}
        return Response(**fields)

    def final(self, text: str, fin: Finished) -> Response:
        return self.response("incomplete" if fin.finish_reason == "length" else "completed", text, fin)


async def stream(gen: Generation, rb: ResponseBuilder) -> AsyncIterator[bytes]:
    seq = 0

    def ev(cls: type, **kw: Any) -> bytes:
        nonlocal seq
        out = sse.event(cls(sequence_number=seq, **kw))
        seq += 1
        return out

    parts: list[str] = []
    try:
        yield ev(ResponseCreatedEvent, type="response.created", response=rb.response("in_progress"))
        yield ev(ResponseInProgressEvent, type="response.in_progress", response=rb.response("in_progress"))
        yield ev(ResponseOutputItemAddedEvent, type="response.output_item.added", output_index=0,
                 item=rb.message(None, "in_progress"))
        yield ev(ResponseContentPartAddedEvent, type="response.content_part.added", output_index=0,
                 content_index=0, item_id=rb.msg_id, part=rb.part(""))
        async for item in gen:
            if isinstance(item, TextDelta):
                if item.text:
                    parts.append(item.text)
                    yield ev(ResponseTextDeltaEvent, type="response.output_text.delta", output_index=0,
                             content_index=0, item_id=rb.msg_id, delta=item.text, logprobs=[])
            elif isinstance(item, Finished):
                text = "".join(parts)
                status = "incomplete" if item.finish_reason == "length" else "completed"
                yield ev(ResponseTextDoneEvent, type="response.output_text.done", output_index=0, content_index=0,
                         item_id=rb.msg_id, text=text, logprobs=[])
                yield ev(ResponseContentPartDoneEvent, type="response.content_part.done", output_index=0,
                         content_index=0, item_id=rb.msg_id, part=rb.part(text))
                yield ev(ResponseOutputItemDoneEvent, type="response.output_item.done", output_index=0,
                         item=rb.message(text, status))
                final = rb.final(text, item)
                if status == "completed":
                    yield ev(ResponseCompletedEvent, type="response.completed", response=final)
                else:
                    yield ev(ResponseIncompleteEvent, type="response.incomplete", response=final)
                return
            elif isinstance(item, Failed):
                raise failed_error(item)
    except Exception as exc:  # noqa: BLE001 - reported in-band, the server keeps serving
        err = as_api_error(exc)
        yield ev(ResponseErrorEvent, type="error", code=err.code or err.type, message=err.message, param=err.param)
        yield ev(ResponseFailedEvent, type="response.failed", response=rb.response("failed", error=err))
    finally:
        await gen.aclose()  # deterministic even when this generator is closed at a yield (disconnect)
