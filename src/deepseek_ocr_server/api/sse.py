"""Server-sent events: encoding and a streaming response that always releases its generation.

Starlette cancels a streaming body when the client disconnects; :class:`SSEResponse` then closes the
body iterator (shielded from the cancellation), whose ``finally`` closes the engine iterator, which
cancels the sequence in the engine and frees its slot.
"""

from __future__ import annotations

import json
from typing import Any

import anyio
from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

DONE = b"data: [DONE]\n\n"


def dump(obj: BaseModel) -> dict[str, Any]:
    """Wire form of an openai type: the fields we set, in JSON mode (explicit nulls kept)."""
    return obj.model_dump(mode="json", exclude_unset=True, by_alias=True)


def data(obj: BaseModel | dict[str, Any]) -> bytes:
    payload = dump(obj) if isinstance(obj, BaseModel) else obj
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def event(obj: BaseModel) -> bytes:
    payload = dump(obj)
    return (
        b"event: " + str(payload["type"]).encode() + b"\ndata: "
        + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"
    )


class SSEResponse(StreamingResponse):
    media_type = "text/event-stream"

    def __init__(self, content: Any, headers: dict[str, str] | None = None) -> None:
        super().__init__(
            content,
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})},
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()
