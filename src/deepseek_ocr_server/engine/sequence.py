"""One generating sequence: sampler, text stream, stop rules and counters.

Shared by the single-request ``generate`` loop and the batching scheduler so that a sequence behaves
identically whatever else is running.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..models.base import OcrModel, Prepared, SequenceCache
from ..sampling import Sampler, SamplingParams
from ..textstream import TextStream

FinishReason = Literal["stop", "length"]


@dataclass
class Step:
    """What one accepted token produced."""

    text: str  # new text to emit (may be empty)
    finished: bool
    finish_reason: FinishReason | None = None


class Sequence:
    def __init__(
        self,
        model: OcrModel,
        prepared: Prepared,
        params: SamplingParams,
        max_new_tokens: int,
        stop: list[str] | None = None,
    ) -> None:
        self.model = model
        self.prepared = prepared
        self.params = params
        self.max_new_tokens = max_new_tokens
        self.stop = [s for s in (stop or []) if s]
        self.sampler = Sampler(params, prepared.input_ids)
        self.stream = TextStream(model.tokenizer)
        self.generated: list[int] = []
        self.cache: SequenceCache | None = None
        self.finish_reason: FinishReason | None = None
        self._pending = ""  # text held back because it may begin a stop string
        self._out: list[str] = []

    @property
    def num_prompt_tokens(self) -> int:
        return self.prepared.num_prompt_tokens

    @property
    def num_generated(self) -> int:
        return len(self.generated)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        return "".join(self._out)

    @property
    def last_token(self) -> int:
        return self.generated[-1]

    def accept_logits(self, logits: torch.Tensor) -> Step:
        """Choose the next token from ``logits`` [vocab] and account for it."""
        return self.accept(self.sampler.choose(logits))

    def accept(self, token: int) -> Step:
        self.generated.append(token)
        self.sampler.push(token)
        if token in self.model.eos_token_ids:
            return self._finish("stop", self.stream.flush())
        new = self.stream.step(token)
        if len(self.generated) >= self.max_new_tokens:
            return self._finish("length", new + self.stream.flush())
        return self._emit(new)

    def _emit(self, new: str) -> Step:
        if not self.stop:
            self._out.append(new)
            return Step(new, False)
        buf = self._pending + new
        cut = min((i for i in (buf.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self._pending = ""
            out = buf[:cut]
            self._out.append(out)
            self.finish_reason = "stop"
            return Step(out, True, "stop")
        # hold back the longest suffix that is a prefix of some stop string
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(buf)), 0, -1):
                if buf.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        out, self._pending = (buf[: len(buf) - hold], buf[len(buf) - hold :]) if hold else (buf, "")
        self._out.append(out)
        return Step(out, False)

    def _finish(self, reason: FinishReason, tail: str) -> Step:
        step = self._emit(tail)
        if step.finished:
            return step
        rest = self._pending
        self._pending = ""
        self._out.append(rest)
        self.finish_reason = reason
        return Step(step.text + rest, True, reason)

    def release(self) -> None:
        if self.cache is not None:
            self.cache.release()
            self.cache = None
