"""Unit tests of the api layer's pure parts: images, conversation collapse, request defaults."""

from __future__ import annotations

import base64
import io
import ipaddress
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deepseek_ocr_server.api.errors import ApiError
from deepseek_ocr_server.api.images import decode_data_url, decode_image, ip_is_public, normalise
from deepseek_ocr_server.api.messages import collapse_chat, collapse_responses
from deepseek_ocr_server.api.resolve import resolve, stop_list
from deepseek_ocr_server.api.schemas import ChatCompletionRequest, ChatMessage, ResponsesInputMessage
from deepseek_ocr_server.config import ModelEntry, ServerSettings, Settings, builtin_settings

OPTS = ServerSettings()


def _png(img: Image.Image, fmt: str = "PNG", **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


# --- images ----------------------------------------------------------------------------------------


def test_normalise_modes_to_rgb() -> None:
    rgba = Image.new("RGBA", (4, 3), (10, 20, 30, 0))  # fully transparent -> white background
    assert normalise(rgba).getpixel((0, 0)) == (255, 255, 255)
    opaque = Image.new("RGBA", (4, 3), (10, 20, 30, 255))
    assert normalise(opaque).getpixel((0, 0)) == (10, 20, 30)
    la = Image.new("LA", (4, 3), (100, 255))
    assert normalise(la).getpixel((1, 1)) == (100, 100, 100)
    p = Image.new("P", (4, 3), 0)
    p.putpalette([200, 10, 20] + [0] * 765)
    assert normalise(p).getpixel((0, 0)) == (200, 10, 20)
    assert normalise(Image.new("L", (2, 2), 7)).getpixel((0, 0)) == (7, 7, 7)
    cmyk = Image.new("CMYK", (2, 2), (0, 0, 0, 0))
    assert normalise(cmyk).getpixel((0, 0)) == (255, 255, 255)
    for img in (rgba, la, p, cmyk):
        assert normalise(img).mode == "RGB"


def test_normalise_16bit_scales_instead_of_clipping() -> None:
    arr = np.array([[0, 32768, 65535]], dtype=np.uint16)
    img = decode_image(_png(Image.fromarray(arr)), OPTS)  # 16-bit PNG
    assert img.mode == "RGB"
    assert [img.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_normalise_16bit_holding_8bit_data_is_kept() -> None:
    arr = np.array([[0, 100, 255]], dtype=np.uint16)
    img = decode_image(_png(Image.fromarray(arr)), OPTS)
    assert [img.getpixel((x, 0))[0] for x in range(3)] == [0, 100, 255]


def test_normalise_colour_key_transparency_on_white() -> None:
    grey = Image.new("L", (3, 1), 40)
    grey.putpixel((1, 0), 90)
    img = decode_image(_png(grey, transparency=90), OPTS)  # tRNS chunk: grey 90 is transparent
    assert [img.getpixel((x, 0)) for x in range(3)] == [(40, 40, 40), (255, 255, 255), (40, 40, 40)]


def test_exif_rotation_applied() -> None:
    img = Image.new("RGB", (6, 2), (1, 2, 3))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    out = decode_image(_png(img, "JPEG", exif=exif.tobytes()), OPTS)
    assert out.size == (2, 6)


def test_pixel_cap_and_non_image() -> None:
    data = _png(Image.new("L", (100, 100)))
    with pytest.raises(ApiError) as e:
        decode_image(data, ServerSettings(max_image_pixels=9999))
    assert e.value.status == 400 and e.value.code == "image_too_large"
    assert decode_image(data, ServerSettings(max_image_pixels=10000)).size == (100, 100)
    with pytest.raises(ApiError) as e:
        decode_image(b"hello world", OPTS)
    assert e.value.code == "invalid_image"
    with pytest.raises(ApiError):
        decode_image(data[: len(data) // 2], OPTS)  # truncated


def test_data_urls() -> None:
    raw = _png(Image.new("RGB", (3, 3)))
    b64 = base64.b64encode(raw).decode()
    assert decode_data_url(f"data:image/png;base64,{b64}", OPTS) == raw
    assert decode_data_url(f"data:image/png;base64,{b64.rstrip('=')}", OPTS) == raw  # missing padding
    for bad, code in [
        ("data:image/png;base64,@@@@", "invalid_base64"),
        ("data:image/png," + b64, "invalid_image_url"),
        ("data:text/plain;base64," + b64, "invalid_image"),
        ("data:image/png;base64", "invalid_image_url"),
    ]:
        with pytest.raises(ApiError) as e:
            decode_data_url(bad, OPTS)
        assert e.value.code == code, bad
    with pytest.raises(ApiError) as e:
        decode_data_url(f"data:image/png;base64,{b64}", ServerSettings(image_fetch_max_bytes=10))
    assert e.value.code == "image_too_large"


@pytest.mark.parametrize(
    ("ip", "public"),
    [
        ("8.8.8.8", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("192.168.0.1", False),
        ("172.16.5.4", False),
        ("169.254.169.254", False),
        ("0.0.0.0", False),
        ("100.64.0.1", False),
        ("::1", False),
        ("fe80::1", False),
        ("fc00::1", False),
        ("::ffff:127.0.0.1", False),
        ("::ffff:8.8.8.8", True),
        ("2001:4860:4860::8888", True),
    ],
)
def test_ip_is_public(ip: str, public: bool) -> None:
    assert ip_is_public(ipaddress.ip_address(ip)) is public


# --- conversation ----------------------------------------------------------------------------------


def _msg(role: str, content: object) -> ChatMessage:
    return ChatMessage(role=role, content=content)


def test_collapse_keeps_latest_user_and_system() -> None:
    conv = collapse_chat(
        [
            _msg("system", "be terse"),
            _msg("user", [{"type": "image_url", "image_url": {"url": "data:a"}}]),
            _msg("assistant", "old answer"),
            _msg("developer", [{"type": "text", "text": "dev note"}]),
            _msg(
                "user",
                [
                    {"type": "text", "text": "<image>\nread"},
                    {"type": "image_url", "image_url": "data:b"},
                    {"type": "text", "text": "this"},
                    {"type": "image_url", "image_url": {"url": "data:c", "detail": "high"}},
                ],
            ),
        ]
    )
    assert conv.text == "<image>\nread\nthis"
    assert [r.url for r in conv.images] == ["data:b", "data:c"]
    assert conv.images[1].param == "messages[4].content[3].image_url.url"
    assert conv.system == "be terse\n\ndev note"


def test_collapse_errors() -> None:
    with pytest.raises(ApiError, match="no user message"):
        collapse_chat([_msg("system", "x")])
    with pytest.raises(ApiError, match="empty"):
        collapse_chat([_msg("user", "   ")])
    with pytest.raises(ApiError, match="unsupported content part"):
        collapse_chat([_msg("user", [{"type": "input_audio", "input_audio": {}}])])
    with pytest.raises(ApiError):
        collapse_chat([_msg("user", [{"type": "image_url", "image_url": {}}])])
    with pytest.raises(ApiError):
        collapse_chat([])


def test_collapse_responses() -> None:
    conv = collapse_responses("just text", "sys")
    assert (conv.text, conv.images, conv.system) == ("just text", [], "sys")
    conv = collapse_responses(
        [ResponsesInputMessage(role="user", content=[{"type": "input_image", "image_url": "data:x"}])], "do OCR"
    )
    assert conv.text == "" and conv.images[0].url == "data:x" and conv.system == "do OCR"


# --- defaults / sampling ---------------------------------------------------------------------------


def _body(**kw: object) -> ChatCompletionRequest:
    return ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], **kw)


SETTINGS = Settings(
    config_path=Path("config.toml"),
    cache_dir=Path("cache"),
    models={
        "a": ModelEntry(id="a", kind="fake", overrides=dict(
            top_p=0.9, repetition_penalty=1.1, no_repeat_ngram_size=35, base_size=640, image_size=512,
            crop_mode=False, max_new_tokens=77,
        )),
    },
)


def test_resolve_precedence_body_over_settings_over_builtin() -> None:
    sp, vs, budget = resolve(_body(), "a", SETTINGS, None, budget_param="max_tokens")
    assert (sp.top_p, sp.repetition_penalty, sp.no_repeat_ngram_size, budget) == (0.9, 1.1, 35, 77)
    assert vs == {"base_size": 640, "image_size": 512, "crop_mode": False}  # the options the family reads
    sp, vs, budget = resolve(
        _body(top_p=0.5, no_repeat_ngram_size=0, base_size=1024, crop_mode=True), "a", SETTINGS, 9,
        budget_param="max_tokens",
    )
    assert (sp.top_p, sp.no_repeat_ngram_size, vs["base_size"], vs["crop_mode"], budget) == (0.5, 0, 1024, True, 9)
    # the request did not change the defaults for the next one
    assert resolve(_body(), "a", SETTINGS, None, budget_param="max_tokens")[2] == 77
    # no settings at all: built-in defaults
    sp, vs, budget = resolve(_body(), "a", builtin_settings(), None, budget_param="max_tokens")
    assert (sp.do_sample, sp.no_repeat_ngram_size, vs, budget) == (False, 20, {}, 512)


def test_resolve_temperature_turns_sampling_on() -> None:
    sp, _, _ = resolve(_body(temperature=0.7), "a", SETTINGS, None, budget_param="max_tokens")
    assert sp.do_sample and sp.temperature == 0.7 and not sp.greedy
    sp, _, _ = resolve(_body(temperature=0.0), "a", SETTINGS, None, budget_param="max_tokens")
    assert sp.greedy
    sp, _, _ = resolve(_body(temperature=0.7, do_sample=False), "a", SETTINGS, None, budget_param="max_tokens")
    assert not sp.do_sample and sp.greedy
    sp, _, _ = resolve(_body(do_sample=True), "a", SETTINGS, None, budget_param="max_tokens")
    assert sp.do_sample and sp.temperature == 1.0


def test_resolve_rejects_out_of_range() -> None:
    with pytest.raises(ApiError) as e:
        resolve(_body(), "a", SETTINGS, 10**6, budget_param="max_tokens")
    assert e.value.param == "max_tokens"
    with pytest.raises(ApiError):
        stop_list(["x"] * 17)
    assert stop_list("a") == ["a"] and stop_list(["a", ""]) == ["a"]
