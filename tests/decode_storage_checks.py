"""Checks shared by the float16 decode-storage tests of both model families (models/layers.py)."""

from __future__ import annotations

import torch

from deepseek_ocr_server.models.base import OcrModel, Prepared


def greedy_steps(m: OcrModel, prep: Prepared, n: int, forced: list[int] | None = None):
    """Greedy tokens and the logits of each of ``n`` decode steps (fed ``forced`` tokens when given)."""
    logits, cache = m.prefill(prep, n + 1)
    toks, steps = [], []
    for i in range(n):
        toks.append(int(torch.argmax(logits)))
        logits = m.decode([forced[i] if forced else toks[-1]], [cache])[0]
        steps.append(logits)
    return toks, torch.stack(steps)


def near_tie(logits: torch.Tensor) -> bool:
    """Top-2 logits within 2 bfloat16 steps of each other: greedy may pick either."""
    top = logits.topk(2).values
    ulp = 2.0 ** (torch.floor(torch.log2(top[0].abs())).item() - 7)
    return bool(top[0] - top[1] <= 2 * ulp)


def assert_same_greedy(plain: tuple[list[int], torch.Tensor], f16, f16_forced) -> None:
    """float16 storage picks the same greedy token as bfloat16 storage at every step (fed the same
    tokens), except at a near-tie of the bfloat16 logits; the free-running greedy tokens are identical
    up to the first such tie (all 32 when there is none); the logits are close."""
    toks, logits = plain
    ties = [i for i in range(1, len(toks)) if near_tie(logits[i - 1])]
    first = ties[0] if ties else len(toks)
    assert f16[0][:first] == toks[:first]
    forced_toks, forced_logits = f16_forced
    assert forced_toks[0] == toks[0]
    for i in range(1, len(toks)):
        assert int(torch.argmax(forced_logits[i - 1])) == toks[i] or i in ties, i
    assert len(ties) <= 8, ties  # most steps are compared strictly: the test is not vacuous
    # close (a step may differ more where an MoE router picks another expert from a near-tie)
    assert (forced_logits - logits).abs().mean() <= 0.005 * logits.abs().max()
    assert torch.corrcoef(torch.stack([forced_logits.flatten(), logits.flatten()]))[0, 1] > 0.999
