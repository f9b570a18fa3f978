"""Request defaults: per model from the settings (CLI > config > built-in), then the body, for one request.

This is the only place where the request body meets the configured defaults.

Sampling switch: an explicit ``do_sample`` wins. Without it, an explicit ``temperature`` decides
(``> 0`` samples, ``0`` is greedy): OpenAI clients that send a temperature expect sampling. A request
that turns sampling on (``do_sample: true``) without any temperature while the configured default is 0
samples at temperature 1.0 (the usual neutral value), since sampling at 0 would be greedy anyway.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from ..models.base import VisionSettings
from ..sampling import SamplingParams
from .errors import ApiError
from .schemas import DecodeFields

BUILTIN_MAX_NEW_TOKENS = 512
#: hard cap on a request's token budget (an absurd budget would size huge KV caches)
MAX_NEW_TOKENS_LIMIT = 32768

_FALLBACK_PROMPT = "OCR this image."


def _defaults(settings: Any, model_id: str) -> Any:
    fn = getattr(settings, "inference_for", None)
    return fn(model_id) if callable(fn) else None


def default_prompt(settings: Any, model_id: str) -> str:
    fn = getattr(settings, "default_prompt", None)
    prompt = fn(model_id) if callable(fn) else None
    return prompt if isinstance(prompt, str) and prompt.strip() else _FALLBACK_PROMPT


def _pick(body_value: Any, defaults: Any, name: str, builtin: Any) -> Any:
    if body_value is not None:
        return body_value
    v = getattr(defaults, name, None) if defaults is not None else None
    return builtin if v is None else v


def resolve(
    body: DecodeFields, model_id: str, settings: Any, max_new_tokens: int | None, *, budget_param: str
) -> tuple[SamplingParams, VisionSettings, int]:
    """Sampling and vision settings and the token budget of one request; 400 for invalid values."""
    d = _defaults(settings, model_id)
    sp0, vs0 = SamplingParams(), VisionSettings()

    temperature = _pick(body.temperature, d, "temperature", sp0.temperature)
    if body.do_sample is not None:
        do_sample = body.do_sample
    elif body.temperature is not None:
        do_sample = body.temperature > 0
    else:
        do_sample = bool(_pick(None, d, "do_sample", sp0.do_sample))
    if do_sample and body.do_sample is not None and body.temperature is None and temperature <= 0:
        temperature = 1.0

    values = {
        "do_sample": do_sample,
        "temperature": float(temperature),
        "top_p": float(_pick(body.top_p, d, "top_p", sp0.top_p)),
        "top_k": _pick(body.top_k, d, "top_k", sp0.top_k),
        "repetition_penalty": float(_pick(body.repetition_penalty, d, "repetition_penalty", sp0.repetition_penalty)),
        "no_repeat_ngram_size": int(_pick(body.no_repeat_ngram_size, d, "no_repeat_ngram_size",
                                          sp0.no_repeat_ngram_size)),
        "seed": _pick(body.seed, d, "seed", sp0.seed),
    }
    assert set(values) == {f.name for f in fields(SamplingParams)}
    sampling = SamplingParams(**values)
    try:
        sampling.validate()
    except ValueError as exc:
        param = str(exc).split(" ", 1)[0]
        raise ApiError(str(exc), param=param, code="invalid_value") from None

    vision = VisionSettings(
        base_size=int(_pick(body.base_size, d, "base_size", vs0.base_size)),
        image_size=int(_pick(body.image_size, d, "image_size", vs0.image_size)),
        crop_mode=bool(_pick(body.crop_mode, d, "crop_mode", vs0.crop_mode)),
    )
    budget = int(_pick(max_new_tokens, d, "max_new_tokens", BUILTIN_MAX_NEW_TOKENS))
    if max_new_tokens is not None and budget > MAX_NEW_TOKENS_LIMIT:
        raise ApiError(
            f"{budget_param} must be <= {MAX_NEW_TOKENS_LIMIT}, got {budget}", param=budget_param, code="invalid_value"
        )
    return sampling, vision, budget


def stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    items = [stop] if isinstance(stop, str) else list(stop)
    if len(items) > 16:
        raise ApiError("'stop' accepts at most 16 sequences", param="stop", code="invalid_value")
    return [s for s in items if s]
