"""The contract between the engine and every model family.

A model family lives in ``models/<family>/``: its ``spec.py`` declares it (``models/registry.py``) and
names one class implementing :class:`OcrModel`.
The engine never looks inside a model: it calls ``prepare`` (CPU preprocessing, tokenisation),
``prefill`` (vision + prompt, returns the logits of the last prompt position and an opaque per-sequence
cache) and ``decode`` (one new token for each of several sequences, possibly of different lengths).
A prefill calls the ``between_layers`` callback it is given after every layer: that is where the engine
interleaves decode steps of the running sequences (the rules are in :meth:`OcrModel.prefill`).
Generation loops, sampling and text streaming are shared code (``engine/``, ``sampling.py``,
``textstream.py``) so that both families behave identically.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image

from ..settings import QUANTIZE
from .precision import Precision, resolve_precision


class ModelLoadError(RuntimeError):
    """A checkpoint could not be loaded (missing/unexpected/mis-shaped tensor, bad config...)."""


class InputError(ValueError):
    """The request cannot be served by this model (bad image count, prompt too long, ...).

    The API layer turns it into a 400 with the message as the error text.
    """


def check_prompt_fits(num_prompt_tokens: int, max_context: int) -> None:
    """The one context-fit rule: a prompt must leave room for at least one generated token in the
    model's context, else :class:`InputError` (a 400)."""
    if num_prompt_tokens >= max_context:
        raise InputError(f"the prompt is {num_prompt_tokens} tokens; the model's context is {max_context}")


def generation_budget(num_prompt_tokens: int, max_new_tokens: int, max_context: int) -> int:
    """``max_new_tokens`` capped by the context left after the prompt (an answer that reaches the cap
    ends with finish reason ``length``); :class:`InputError` when the prompt leaves no room."""
    check_prompt_fits(num_prompt_tokens, max_context)
    return max(1, min(max_new_tokens, max_context - num_prompt_tokens))


SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SUPPORTED_QUANTIZE = (None, *QUANTIZE)


def check_load_options(
    kind: str, dtype: torch.dtype | Precision | str | None, quantize: str | None, device: object = "cpu"
) -> Precision:
    """The load options every family accepts; anything else is a :class:`ModelLoadError`. Returns the
    precision plan of each phase (``models.precision``): ``dtype`` None / ``"auto"`` = by the CPU
    class, a ``torch.dtype`` = that dtype everywhere, or a :class:`Precision` as given."""
    if quantize not in SUPPORTED_QUANTIZE:
        allowed = " or ".join(repr(q) for q in SUPPORTED_QUANTIZE)
        raise ModelLoadError(f"{kind}: quantize={quantize!r} is not supported ({allowed})")
    if isinstance(dtype, torch.dtype) and dtype not in SUPPORTED_DTYPES:
        raise ModelLoadError(f"{kind}: unsupported dtype {dtype} (float32, bfloat16, float16)")
    try:
        return resolve_precision(dtype, device)
    except ValueError as exc:
        raise ModelLoadError(f"{kind}: {exc}") from exc


@dataclass(frozen=True)
class ModelFiles:
    """Where one checkpoint's files are, as resolved by ``assets``.

    ``weights`` is a ``.safetensors`` file or a ``*.safetensors.index.json`` shard index.
    ``extras_dir`` holds optional side files (``preprocessor_config.json``, ``chat_template.jinja``,
    ``generation_config.json``, ``tokenizer_config.json``); usually the checkpoint directory.
    """

    config: Path
    weights: Path
    tokenizer: Path
    extras_dir: Path | None = None

    @classmethod
    def from_dir(cls, directory: str | Path) -> ModelFiles:
        d = Path(directory)
        index = sorted(d.glob("*.safetensors.index.json"))
        if index:
            weights = index[0]
        elif (d / "model.safetensors").exists():
            weights = d / "model.safetensors"
        else:
            shards = sorted(d.glob("*.safetensors"))
            weights = shards[0] if shards else d / "model.safetensors"
        return cls(config=d / "config.json", weights=weights, tokenizer=d / "tokenizer.json", extras_dir=d)

    def extra(self, name: str) -> Path | None:
        """Path of an optional side file, or None when absent."""
        for base in (self.extras_dir, self.config.parent):
            if base is not None and (base / name).is_file():
                return base / name
        return None

    def read_json(self, name: str) -> dict[str, Any] | None:
        p = self.extra(name)
        return json.loads(p.read_text(encoding="utf-8")) if p else None


#: A family's request options by name: the settings its spec's ``options`` lists (``base_size`` ...),
#: resolved (config < request). A family reads the names it declares; one that declares none ignores it.
RequestOptions = Mapping[str, Any]


@dataclass
class Prepared:
    """A request after CPU preprocessing: ready for ``prefill``.

    ``input_ids`` is the full prompt (image placeholders expanded). ``inputs`` carries the
    model-specific tensors (pixel values, grids, ...), opaque to the engine.
    """

    input_ids: list[int]
    inputs: dict[str, Any] = field(default_factory=dict)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.input_ids)


class SequenceCache(abc.ABC):
    """Opaque per-sequence decoding state (KV cache, rope offsets, ...)."""

    @property
    @abc.abstractmethod
    def length(self) -> int:
        """Number of tokens already in the cache (prompt + fed-back tokens)."""

    def release(self) -> None:  # noqa: B027 - optional hook
        """Drop the buffers early (the engine calls this when a sequence leaves)."""


#: What ``prefill`` calls between layers (see :meth:`OcrModel.prefill` for the rules).
BetweenLayers = Callable[[], None]


def no_pause() -> None:
    """The default ``between_layers``: a prefill that nobody interleaves."""


class OcrModel(abc.ABC):
    """Interface every model family implements."""

    kind: ClassVar[str]
    #: Literal placeholder a prompt may contain to mark where an image goes.
    image_placeholder: ClassVar[str] = "<image>"

    tokenizer: Any  # tokenizers.Tokenizer
    eos_token_ids: frozenset[int]
    device: torch.device
    #: the language model's compute dtype (activations, prefill); ``precision`` has every phase's
    dtype: torch.dtype
    precision: Precision | None = None
    #: whether ``load(dtype=None)`` builds the per-phase plan (else ``models.load_model`` passes one dtype)
    precision_plans: ClassVar[bool] = False
    #: Longest prompt + generation the model supports (positions).
    max_context: int

    @classmethod
    @abc.abstractmethod
    def load(
        cls,
        files: ModelFiles,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | Precision | None = None,
        quantize: str | None = None,
    ) -> OcrModel:
        """Load strictly from the original checkpoint layout. ``dtype``: None = per phase by the CPU
        class (:func:`check_load_options`); ``quantize``: None or "int8"."""

    @abc.abstractmethod
    def prepare(
        self,
        text: str,
        images: list[Image.Image],
        settings: RequestOptions | None = None,
        system: str | None = None,
    ) -> Prepared:
        """Build the prompt for ``text`` (may contain ``image_placeholder`` markers) and ``images``;
        ``settings``: the request's options (:data:`RequestOptions`).

        Images without a marker in the text are placed where the model expects them.
        Raises :class:`InputError` for requests the model cannot serve.
        """

    def continue_answer(self, prepared: Prepared, partial: str) -> Prepared:
        """``prepared`` with the start of the answer (``partial``, text the model would have written)
        appended after the generation prompt, so that generation continues it ("continue response" in
        chat UIs). This default suits models whose positions are the token indices; a family with
        multimodal positions computed in ``prepare`` overrides it."""
        ids = self.tokenizer.encode(partial, add_special_tokens=False).ids if partial else []
        out = Prepared([*prepared.input_ids, *ids], dict(prepared.inputs))
        check_prompt_fits(out.num_prompt_tokens, self.max_context)
        return out

    @abc.abstractmethod
    def prefill(
        self, prepared: Prepared, max_new_tokens: int, between_layers: BetweenLayers = no_pause
    ) -> tuple[torch.Tensor, SequenceCache]:
        """Run vision + the whole prompt. Returns float32 logits ``[vocab]`` of the last position and
        the sequence's cache, sized for ``max_new_tokens`` more tokens.

        ``between_layers()`` is how a long prefill shares the CPU with the sequences already decoding:
        the model calls it after every layer of its vision encoder(s) and of its language model (a few
        dozen times per page; never inside a layer). The engine uses it to run decode steps of the
        other sequences in the middle of the prefill, so a family that does not call it loses the
        engine's latency bound (``tests/test_model_protocol.py`` checks every registered family).
        The re-entrancy rule:

        - the callback may call :meth:`decode` on this same model for OTHER sequences' caches (the
          cache being prefilled is not handed out before ``prefill`` returns), so nothing the prefill
          keeps between two layers may live in model-wide state that ``decode`` touches;
        - it never calls ``prefill`` (one prefill at a time per model), and ``decode`` takes no
          callback, so the callback is never re-entered;
        - it may raise (the engine does, to drop a cancelled request): the exception leaves
          ``prefill`` unchanged and the half-built cache is garbage.
        """

    @abc.abstractmethod
    def decode(self, tokens: list[int], caches: list[SequenceCache]) -> torch.Tensor:
        """Feed one token per sequence (sequences may have different lengths); returns float32 logits
        ``[len(tokens), vocab]`` and advances every cache by one."""

    def vocab_size(self) -> int:
        """Number of ids the tokenizer can decode (logit rows beyond it have no text)."""
        return int(self.tokenizer.get_vocab_size(with_added_tokens=True))
