"""Plain synchronous generation over the model protocol (tests, benchmarks, the CLI-less path).

The serving scheduler (``engine/scheduler.py``) runs the same :class:`Sequence` objects with continuous
batching; ``generate_batch`` here is the simple static-batch version of the same loop.
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


def _result(seq: Sequence) -> GenerationResult:
    assert seq.finish_reason is not None
    return GenerationResult(
        text=seq.text,
        token_ids=list(seq.generated),
        finish_reason=seq.finish_reason,
        prompt_tokens=seq.num_prompt_tokens,
        completion_tokens=seq.num_generated,
    )


def _fit(model: OcrModel, prepared: Prepared, max_new_tokens: int) -> int:
    return generation_budget(prepared.num_prompt_tokens, max_new_tokens, model.max_context)


def generate_stream(
    model: OcrModel,
    prepared: Prepared,
    params: SamplingParams | None = None,
    max_new_tokens: int = 512,
    stop: list[str] | None = None,
) -> Iterator[str | GenerationResult]:
    """Yield text increments as they are produced, then the final :class:`GenerationResult`."""
    max_new_tokens = _fit(model, prepared, max_new_tokens)
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
    yield _result(seq)


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


def generate_batch(
    model: OcrModel,
    prepared: list[Prepared],
    params: list[SamplingParams] | SamplingParams | None = None,
    max_new_tokens: list[int] | int = 512,
) -> list[GenerationResult]:
    """Prefill each request, then decode all unfinished sequences together, one step at a time."""
    n = len(prepared)
    plist = params if isinstance(params, list) else [params or SamplingParams()] * n
    mlist = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * n
    seqs = [Sequence(model, p, sp, _fit(model, p, m)) for p, sp, m in zip(prepared, plist, mlist, strict=True)]
    try:
        for seq in seqs:
            logits, seq.cache = model.prefill(seq.prepared, seq.max_new_tokens)
            if seq.accept_logits(logits).finished:
                seq.release()
        while running := [s for s in seqs if not s.finished]:
            logits = model.decode([s.last_token for s in running], [s.cache for s in running])
            for row, seq in zip(logits, running, strict=True):
                if seq.accept_logits(row).finished:
                    seq.release()
    finally:
        for seq in seqs:
            seq.release()
    return [_result(s) for s in seqs]
