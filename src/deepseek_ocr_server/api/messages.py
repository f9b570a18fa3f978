"""Conversation -> what the OCR model sees.

OCR models answer one image-bearing question at a time, so a conversation is collapsed (seed
behaviour): the LATEST user message is the request; system/developer messages (and the Responses
``instructions``) are kept as the system text; earlier user/assistant turns are dropped.

Inside the user message, text parts are joined with newlines and image parts are collected in order.
Explicit ``<image>`` markers in the text are passed through untouched; the model places images it finds
no marker for. Image-only messages get the model entry's default task prompt (``resolve.py``).

Client metadata is not prompt text: chat UIs (Open WebUI) put an ``<attached_files>`` block listing the
uploaded files before the user's words; such blocks (and text that is nothing but ``<file .../>``
tags) are removed before the prompt is chosen, so an image sent alone still gets the default prompt.

A conversation that ENDS with an assistant message after the last user message is a "continue
response": that partial answer is the start of the model's answer and generation continues it
(``Conversation.answer_prefix``); the reply holds only the new text.

Documents come as file parts: ``{"type": "file", "file": {"filename", "file_data"}}`` (Chat Completions)
and ``{"type": "input_file", "filename", "file_data" | "file_url"}`` (Responses); ``file_data`` is a
``data:`` URL or bare base64. They are collected in ``Conversation.files`` (``api/documents.py`` reads them).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import ApiError
from .schemas import ChatMessage, ResponsesInputMessage

_TEXT_TYPES = {"text", "input_text", "output_text"}
_IMAGE_TYPES = {"image_url", "input_image"}
_FILE_TYPES = {"file", "input_file"}
_SYSTEM_ROLES = {"system", "developer"}
_ASSISTANT_ROLES = {"assistant"}
#: client metadata blocks: Open WebUI's <attached_files> list, and bare self-closing <file .../> tags
_METADATA = re.compile(r"<attached_files>.*?</attached_files>|<file\b[^<>]*/>", re.DOTALL)


def strip_client_metadata(text: str) -> str:
    """``text`` without client metadata blocks (the rest untouched, unless only whitespace is left)."""
    if "<attached_files>" not in text and "<file" not in text:
        return text
    out = _METADATA.sub("", text)
    return out.lstrip() if out.strip() else ""


@dataclass
class ImageRef:
    url: str
    param: str  # where it came from, for error messages ("messages[1].content[0].image_url")


@dataclass
class FileRef:
    data: str | None  # file_data: a data: URL or bare base64
    url: str | None  # file_url (Responses)
    filename: str | None
    param: str


@dataclass
class Conversation:
    text: str
    images: list[ImageRef] = field(default_factory=list)
    system: str | None = None
    #: start of the answer to continue (the conversation ended with a partial assistant message)
    answer_prefix: str | None = None
    files: list[FileRef] = field(default_factory=list)


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


def _file_ref(part: dict[str, Any], param: str) -> FileRef:
    """A ``file`` (chat: fields under ``file``) or ``input_file`` (responses: fields on the part) part."""
    inner = part.get("file") if part.get("type") == "file" else part
    where = f"{param}.file" if part.get("type") == "file" else param
    if not isinstance(inner, dict):
        raise ApiError("file part without a 'file' object", param=where, code="invalid_file")
    data, url, name = inner.get("file_data"), inner.get("file_url"), inner.get("filename")
    if data is None and url is None:
        if inner.get("file_id") is not None:
            raise ApiError("file_id references are not supported (this server has no file store); send the "
                           "document inline as file_data", param=f"{where}.file_id", code="invalid_file")
        raise ApiError("file part without file_data or file_url", param=where, code="invalid_file")
    for key, value in (("file_data", data), ("file_url", url), ("filename", name)):
        if value is not None and not isinstance(value, str):
            raise ApiError(f"'{key}' must be a string", param=f"{where}.{key}", code="invalid_file")
    return FileRef(data, url, name, f"{where}.file_data" if data is not None else f"{where}.file_url")


def _user_parts(
    content: str | list[dict[str, Any]] | None, param: str, files: list[FileRef] | None = None
) -> tuple[str, list[ImageRef]]:
    if content is None:
        return "", []
    if isinstance(content, str):
        return strip_client_metadata(content), []
    texts: list[str] = []
    images: list[ImageRef] = []
    for i, part in enumerate(content):
        p = f"{param}[{i}]"
        kind = _kind(part)
        if kind in _TEXT_TYPES:
            text = part.get("text")
            if not isinstance(text, str):
                raise ApiError("text part without a string 'text'", param=f"{p}.text", code="invalid_value")
            texts.append(strip_client_metadata(text))
        elif kind in _IMAGE_TYPES:
            images.append(_image_url(part, f"{p}.image_url"))
        elif kind in _FILE_TYPES and files is not None:
            files.append(_file_ref(part, p))
        else:
            raise ApiError(
                f"unsupported content part type {kind!r}; this server accepts text, image and file parts",
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
    files: list[FileRef] = []
    text, images = _user_parts(messages[last_user].content, f"{prefix}[{last_user}].content", files)
    if not text.strip() and not images and not files:
        raise ApiError("the user message is empty", param=f"{prefix}[{last_user}].content", code="invalid_value")
    answer_prefix = None
    last = messages[-1]
    if len(messages) - 1 > last_user and last.role in _ASSISTANT_ROLES:
        answer_prefix = _text_of(last.content) or None
    return Conversation(
        text=text, images=images, system="\n\n".join(system_parts) or None, files=files,
        answer_prefix=answer_prefix,
    )


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
