"""Chat Completions wire format, built from the ``openai`` package's types.

Stream: a role chunk, content deltas, a chunk with ``finish_reason``, a usage chunk with empty
``choices`` only when ``stream_options.include_usage`` is set, then ``data: [DONE]``. An error after
the stream started is sent as ``data: {"error": {...}}`` (what the SDK raises as APIError) and the
stream ends without ``[DONE]``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.completion_usage import CompletionUsage

from ..engine.types import Failed, Finished, TextDelta
from . import sse
from .errors import as_api_error
from .service import Generation, failed_error


def _usage(fin: Finished) -> CompletionUsage:
    return CompletionUsage(
        prompt_tokens=fin.prompt_tokens,
        completion_tokens=fin.completion_tokens,
        total_tokens=fin.prompt_tokens + fin.completion_tokens,
    )


def _document(fin: Finished) -> dict[str, object]:
    """The structured result of a document answer (``output_format: "blocks"``), as an extra field."""
    document = getattr(fin, "document", None)
    return {"document": document} if document is not None else {}


def completion(cid: str, model: str, text: str, fin: Finished) -> ChatCompletion:
    return ChatCompletion(
        id=cid,
        object="chat.completion",
        created=int(time.time()),
        model=model,
        choices=[
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": fin.finish_reason,
            }
        ],
        usage=_usage(fin),
        **_document(fin),
    )


async def stream(
    gen: Generation, cid: str, model: str, include_usage: bool
) -> AsyncIterator[bytes]:
    created = int(time.time())

    def chunk(delta: dict[str, object], finish: str | None = None) -> bytes:
        return sse.data(
            ChatCompletionChunk(
                id=cid,
                object="chat.completion.chunk",
                created=created,
                model=model,
                choices=[{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            )
        )

    try:
        yield chunk({"role": "assistant", "content": ""})
        async for ev in gen:
            if isinstance(ev, TextDelta):
                if ev.text:
                    yield chunk({"content": ev.text})
            elif isinstance(ev, Finished):
                yield chunk({}, ev.finish_reason)
                if include_usage:
                    yield sse.data(
                        ChatCompletionChunk(
                            id=cid, object="chat.completion.chunk", created=created, model=model,
                            choices=[], usage=_usage(ev),
                        )
                    )
                if extra := _document(ev):  # the structured result: one more chunk without choices
                    yield sse.data(
                        ChatCompletionChunk(
                            id=cid, object="chat.completion.chunk", created=created, model=model, choices=[],
                            **extra,
                        )
                    )
                yield sse.DONE
                return
            elif isinstance(ev, Failed):
                yield sse.data(failed_error(ev).body())
                return
    except Exception as exc:  # noqa: BLE001 - reported in-band, the server keeps serving
        yield sse.data(as_api_error(exc).body())
    finally:
        await gen.aclose()  # deterministic even when this generator is closed at a yield (disconnect)
