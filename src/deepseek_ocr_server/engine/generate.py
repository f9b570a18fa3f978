"""Plain synchronous generation over the model protocol (tests, benchmarks, the CLI-less path).

The serving scheduler (``engine/scheduler.py``) runs the same :class:`Sequence` objects with continuous
batching (a static-batch loop for tests and benchmarks is ``testing/generation.py``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from ..models.base import OcrModel, Prepared, generation_budget
from ..sampling import SamplingParams
from .sequence import FinishReason, Sequence


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int


def result_of(seq: Sequence) -> GenerationResult:
    assert seq.finish_reason is not None
    return GenerationResult(
        text=seq.text,
        token_ids=list(seq.generated),
        finish_reason=seq.finish_reason,
        prompt_tokens=seq.num_prompt_tokens,
        completion_tokens=seq.num_generated,
    )


def generate_stream(
    model: OcrModel,
    prepared: Prepared,
    params: SamplingParams | None = None,
    max_new_tokens: int = 512,
    stop: list[str] | None = None,
) -> Iterator[str | GenerationResult]:
    """Yield text increments as they are produced, then the final :class:`GenerationResult`."""
    max_new_tokens = generation_budget(prepared.num_prompt_tokens, max_new_tokens, model.max_context)
    seq = Sequence(model, prepared, params or SamplingParams(), max_new_tokens, stop)
    try:
        logits, seq.cache = model.prefill(prepared, max_new_tokens)
        while True:
            step = seq.accept_logits(logits)
            if step.text:
                yield step.text
            if step.finished:
                break
            logits = model.decode([seq.last_token], [seq.cache])[0]
    finally:
        seq.release()
    yield result_of(seq)


def generate(
    model: OcrModel,
    prepared: Prepared,
    params: SamplingParams | None = None,
    max_new_tokens: int = 512,
    stop: list[str] | None = None,
) -> GenerationResult:
    out = None
    for item in generate_stream(model, prepared, params, max_new_tokens, stop):
        out = item
    assert isinstance(out, GenerationResult)
    return out
