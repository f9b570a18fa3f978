"""Conversation -> what the OCR model sees.

OCR models answer one image-bearing question at a time, so a conversation is collapsed (seed
behaviour): the LATEST user message is the request; system/developer messages (and the Responses
``instructions``) are kept as the system text; earlier user/assistant turns are dropped.

Inside the user message, text parts are joined with newlines and image parts are collected in order.
Explicit ``<image>`` markers in the text are passed through untouched; the model places images it finds
no marker for. Image-only messages get the model entry's default task prompt (``resolve.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import ApiError
from .schemas import ChatMessage, ResponsesInputMessage

_TEXT_TYPES = {"text", "input_text", "output_text"}
_IMAGE_TYPES = {"image_url", "input_image"}
_SYSTEM_ROLES = {"system", "developer"}


@dataclass
class ImageRef:
    url: str
    param: str  # where it came from, for error messages ("messages[1].content[0].image_url")


@dataclass
class Conversation:
    text: str
    images: list[ImageRef] = field(default_factory=list)
    system: str | None = None


def _text_of(content: str | list[dict[str, Any]] | None) -> str:
    """Plain text of a (system) message: string content or its text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(
        p["text"] for p in content if _kind(p) in _TEXT_TYPES and isinstance(p.get("text"), str)
    )


def _kind(part: dict[str, Any]) -> str | None:
    """A content part's ``type`` when it is a string (anything else is no known type)."""
    kind = part.get("type")
    return kind if isinstance(kind, str) else None


def _image_url(part: dict[str, Any], param: str) -> ImageRef:
    value = part.get("image_url")
    if isinstance(value, dict):
        value = value.get("url")
        param = f"{param}.url"
    if value is None and part.get("file_id") is not None:
        raise ApiError("file_id images are not supported; send a data: URL or an http(s) URL", param=param,
                       code="invalid_image_url")
    if not isinstance(value, str) or not value.strip():
        raise ApiError("image part without an image URL", param=param, code="invalid_image_url")
    return ImageRef(value, param)


def _user_parts(content: str | list[dict[str, Any]] | None, param: str) -> tuple[str, list[ImageRef]]:
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    texts: list[str] = []
    images: list[ImageRef] = []
    for i, part in enumerate(content):
        p = f"{param}[{i}]"
        kind = _kind(part)
        if kind in _TEXT_TYPES:
            text = part.get("text")
            if not isinstance(text, str):
                raise ApiError("text part without a string 'text'", param=f"{p}.text", code="invalid_value")
            texts.append(text)
        elif kind in _IMAGE_TYPES:
            images.append(_image_url(part, f"{p}.image_url"))
        else:
            raise ApiError(
                f"unsupported content part type {kind!r}; this server accepts text and image parts",
                param=f"{p}.type",
                code="invalid_value",
            )
    return "\n".join(t for t in texts if t), images


def _collapse(
    messages: Sequence[ChatMessage | ResponsesInputMessage], prefix: str, instructions: str | None = None
) -> Conversation:
    last_user = None
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].role == "user":
            last_user = i
            break
    if last_user is None:
        raise ApiError("the conversation has no user message", param=prefix, code="invalid_value")
    system_parts = [instructions] if instructions and instructions.strip() else []
    system_parts += [
        t for m in messages[:last_user] if m.role in _SYSTEM_ROLES and (t := _text_of(m.content).strip())
    ]
    text, images = _user_parts(messages[last_user].content, f"{prefix}[{last_user}].content")
    if not text.strip() and not images:
        raise ApiError("the user message is empty", param=f"{prefix}[{last_user}].content", code="invalid_value")
    return Conversation(text=text, images=images, system="\n\n".join(system_parts) or None)


def collapse_chat(messages: list[ChatMessage]) -> Conversation:
    if not messages:
        raise ApiError("'messages' must contain at least one message", param="messages", code="invalid_value")
    return _collapse(messages, "messages")


def collapse_responses(
    input: str | list[ResponsesInputMessage], instructions: str | None
) -> Conversation:
    if isinstance(input, str):
        if not input.strip():
            raise ApiError("'input' is empty", param="input", code="invalid_value")
        system = instructions if instructions and instructions.strip() else None
        return Conversation(text=input, images=[], system=system)
    if not input:
        raise ApiError("'input' must contain at least one message", param="input", code="invalid_value")
    return _collapse(input, "input", instructions)
