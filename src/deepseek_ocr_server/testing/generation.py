"""A static-batch generation loop over the model protocol, for tests and benchmarks: prefill every
request, then decode all unfinished sequences together. The server batches continuously
(``engine/scheduler.py``); both run the same :class:`~..engine.sequence.Sequence` objects, so an answer
here equals the served one."""

from __future__ import annotations

from ..engine.generate import GenerationResult, result_of
from ..engine.sequence import Sequence
from ..models.base import OcrModel, Prepared, generation_budget
from ..sampling import SamplingParams


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
    seqs = [
        Sequence(model, p, sp, generation_budget(p.num_prompt_tokens, m, model.max_context))
        for p, sp, m in zip(prepared, plist, mlist, strict=True)
    ]
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
    return [result_of(s) for s in seqs]
