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

from ..config import InferenceDefaults, Settings
from ..models import registry
from ..sampling import SamplingParams
from ..settings import SETTINGS
from .errors import ApiError
from .schemas import DecodeFields

#: hard cap on a request's token budget (an absurd budget would size huge KV caches)
MAX_NEW_TOKENS_LIMIT = int(SETTINGS["max_new_tokens"].hi or 0)

_FALLBACK_PROMPT = "OCR this image."


def model_defaults(settings: Settings, model_id: str) -> InferenceDefaults:
    """The model's configured defaults; the built-in ones for a model the backend serves without a
    config entry (an app built around a bare manager, as tests do)."""
    return settings.inference_for(model_id) if model_id in settings.models else InferenceDefaults()


def default_prompt(settings: Settings, model_id: str) -> str:
    prompt = settings.default_prompt(model_id) if model_id in settings.models else ""
    return prompt if prompt.strip() else _FALLBACK_PROMPT


def resolve(
    body: DecodeFields, model_id: str, settings: Settings, max_new_tokens: int | None, *, budget_param: str
) -> tuple[SamplingParams, dict[str, Any], int]:
    """Sampling, the model family's request options (``models.base.RequestOptions``) and the token
    budget of one request; 400 for invalid values. A request option the family does not read is
    range-checked and has no effect."""
    d = model_defaults(settings, model_id)

    def pick(body_value: object, name: str) -> object:
        return getattr(d, name) if body_value is None else body_value

    temperature = pick(body.temperature, "temperature")
    if body.do_sample is not None:
        do_sample = body.do_sample
    elif body.temperature is not None:
        do_sample = body.temperature > 0
    else:
        do_sample = d.do_sample
    if do_sample and body.do_sample is not None and body.temperature is None and temperature <= 0:
        temperature = 1.0

    values = {
        "do_sample": do_sample,
        "temperature": float(temperature),
        "top_p": float(pick(body.top_p, "top_p")),
        "top_k": pick(body.top_k, "top_k"),
        "repetition_penalty": float(pick(body.repetition_penalty, "repetition_penalty")),
        "no_repeat_ngram_size": int(pick(body.no_repeat_ngram_size, "no_repeat_ngram_size")),
        "seed": pick(body.seed, "seed"),
    }
    assert set(values) == {f.name for f in fields(SamplingParams)}
    sampling = SamplingParams(**values)
    try:
        sampling.validate()
    except ValueError as exc:
        param = str(exc).split(" ", 1)[0]
        raise ApiError(str(exc), param=param, code="invalid_value") from None

    entry = settings.models.get(model_id)
    names = registry.family(entry.kind).options if entry is not None else ()
    options = {name: pick(getattr(body, name), name) for name in names}
    budget = int(pick(max_new_tokens, "max_new_tokens"))
    if max_new_tokens is not None and budget > MAX_NEW_TOKENS_LIMIT:
        raise ApiError(
            f"{budget_param} must be <= {MAX_NEW_TOKENS_LIMIT}, got {budget}", param=budget_param, code="invalid_value"
        )
    return sampling, options, budget


def stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    items = [stop] if isinstance(stop, str) else list(stop)
    if len(items) > 16:
        raise ApiError("'stop' accepts at most 16 sequences", param="stop", code="invalid_value")
    return [s for s in items if s]
