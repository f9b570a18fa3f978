"""Token selection shared by every model: logits processors and the sampler.

Order of operations (the same as transformers' ``generate``):
repetition penalty -> no-repeat n-gram ban -> [sampling only] temperature -> top-k -> top-p -> draw.
Greedy decoding is the argmax after the first two processors.

The context both processors look at is the WHOLE sequence (prompt ids, image placeholders included,
plus the generated ids), exactly as transformers' ``RepetitionPenaltyLogitsProcessor`` and
``NoRepeatNGramLogitsProcessor`` do over ``input_ids`` (DeepSeek-OCR SPEC §9, HF path).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, fields

import torch

from .settings import SETTINGS, default


@dataclass(frozen=True)
class SamplingParams:
    """Decoding options of one sequence. Validate with :meth:`validate` before use."""

    do_sample: bool = default("do_sample")
    temperature: float = default("temperature")
    top_p: float = default("top_p")
    top_k: int | None = default("top_k")
    repetition_penalty: float = default("repetition_penalty")
    no_repeat_ngram_size: int = default("no_repeat_ngram_size")
    seed: int | None = default("seed")

    def validate(self) -> None:
        """Raise ValueError naming the field when a value is out of range (never clamp); the ranges are
        the settings table's (``settings.py``)."""
        for f in fields(self):
            try:
                SETTINGS[f.name].check(getattr(self, f.name))
            except ValueError as exc:
                raise ValueError(f"{f.name} {exc}") from None

    @property
    def greedy(self) -> bool:
        """Sampling only happens with do_sample and a positive temperature."""
        return not self.do_sample or self.temperature <= 0.0


class NgramBlocker:
    """Incremental no-repeat n-gram ban: O(n) per token instead of rescanning the sequence.

    Keeps a map from each (n-1)-gram seen so far to the tokens that followed it. Semantics equal to
    transformers' ``NoRepeatNGramLogitsProcessor`` on the whole context.
    """

    def __init__(self, n: int, context: list[int]) -> None:
        self.n = n
        self.tokens: list[int] = []
        self.followers: dict[tuple[int, ...], set[int]] = defaultdict(set)
        for t in context:
            self.push(t)

    def push(self, token: int) -> None:
        self.tokens.append(token)
        n = self.n
        if n >= 1 and len(self.tokens) >= n:
            gram = tuple(self.tokens[-n:])
            self.followers[gram[:-1]].add(gram[-1])

    def banned(self) -> set[int]:
        n = self.n
        if n < 1 or len(self.tokens) + 1 < n:
            return set()
        key = tuple(self.tokens[len(self.tokens) - n + 1 :]) if n > 1 else ()
        return self.followers.get(key, set())


class Sampler:
    """Chooses the next token for ONE sequence; holds its RNG and n-gram state."""

    def __init__(self, params: SamplingParams, context: list[int], device: torch.device | str = "cpu") -> None:
        self.params = params
        self.seen: set[int] = set(context)
        self.ngram = NgramBlocker(params.no_repeat_ngram_size, context) if params.no_repeat_ngram_size > 0 else None
        self.generator: torch.Generator | None = None
        if not params.greedy:
            self.generator = torch.Generator(device="cpu")
            if params.seed is not None:
                self.generator.manual_seed(params.seed)
            else:
                self.generator.seed()

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """Apply repetition penalty and the n-gram ban to a float32 ``[vocab]`` row (returns a new tensor)."""
        scores = logits.float().clone()
        p = self.params.repetition_penalty
        if p != 1.0 and self.seen:
            idx = torch.tensor(sorted(self.seen), dtype=torch.long, device=scores.device)
            idx = idx[idx < scores.numel()]
            vals = scores[idx]
            scores[idx] = torch.where(vals < 0, vals * p, vals / p)
        if self.ngram is not None:
            banned = self.ngram.banned()
            if banned:
                idx = torch.tensor(sorted(banned), dtype=torch.long, device=scores.device)
                scores[idx[idx < scores.numel()]] = -math.inf
        return scores

    def choose(self, logits: torch.Tensor) -> int:
        """Next token id from float32 logits ``[vocab]``."""
        scores = self.process(logits)
        prm = self.params
        if prm.greedy:
            return int(torch.argmax(scores).item())
        scores = scores / prm.temperature
        if prm.top_k is not None and prm.top_k < scores.numel():
            kth = torch.topk(scores, prm.top_k).values[-1]
            scores = scores.masked_fill(scores < kth, -math.inf)
        if prm.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=False)
            cum = sorted_scores.softmax(-1).cumsum(-1)
            remove = cum <= (1.0 - prm.top_p)
            remove[-1] = False  # always keep the most likely token
            scores = scores.scatter(0, order, sorted_scores.masked_fill(remove, -math.inf))
        probs = scores.softmax(-1).cpu()
        return int(torch.multinomial(probs, 1, generator=self.generator).item())

    def push(self, token: int) -> None:
        """Record a token that joined the sequence (after it was chosen)."""
        self.seen.add(token)
        if self.ngram is not None:
            self.ngram.push(token)
