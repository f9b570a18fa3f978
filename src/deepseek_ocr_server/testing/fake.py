"""A deterministic fake OCR model that implements :class:`~..models.base.OcrModel` for real.

Used by the engine and API tests (and by anyone who needs a model that loads in milliseconds).

- Tokenizer: a real ``tokenizers`` byte-level tokenizer built in code (one id per byte, no merges) with
  the specials ``<|bos|>``, ``<|eos|>`` and ``<image>``. Byte ``b`` has id ``b``; specials follow at 256+.
- ``prepare`` tokenises ``<|bos|> [system "\\n"] text``; every image becomes ``image_tokens`` copies of
  the ``<image>`` id, at its ``<image>`` marker or (without markers) before the text. Each image also
  contributes a key (CRC of a thumbnail) so different images give different answers.
- ``prefill``/``decode`` produce logits from a tiny deterministic function of the sequence's content:
  a hash ``h`` of the prompt ids and image keys, the position ``i`` of the token being generated and the
  token fed last. Greedy output is ``answer_length(prepared)`` lowercase letters/spaces followed by EOS
  (see :func:`FakeOcrModel.expected_greedy`), so tests can reach both ``stop`` and ``length``.
  Sampling sees a real distribution (every letter has a finite score), so seeds matter.
- Batched ``decode`` takes sequences of different lengths; each cache checks it is not overrun or used
  after ``release``; ``live_caches`` counts caches not yet released.
- ``step_delay`` / ``prefill_delay`` (seconds) slow the model down; ``on_decode`` / ``on_prefill`` /
  ``on_layer`` / ``on_prepare`` callbacks let tests block or observe the worker deterministically. ``prefill_layers`` > 0 makes a
  prefill call its ``between_layers`` callback that many times, as the real models do between layers
  (the delay split among them); ``decodes_during_prefill`` counts decode calls made in the middle of one.
"""

from __future__ import annotations

import json
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from ..models.base import (
    SUPPORTED_QUANTIZE,
    BetweenLayers,
    InputError,
    ModelFiles,
    OcrModel,
    Prepared,
    RequestOptions,
    SequenceCache,
    check_prompt_fits,
    no_pause,
)

BOS = "<|bos|>"
EOS = "<|eos|>"
IMAGE = "<image>"
LETTERS = b"abcdefghijklmnopqrstuvwxyz "
BOS_ID, EOS_ID, IMAGE_ID = 256, 257, 258
VOCAB = 259


def build_tokenizer() -> Tokenizer:
    """Byte-level BPE without merges: id == byte value, then the three specials."""
    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    # ``alphabet()`` is unordered: rebuild the GPT-2 byte -> char map to give byte b the id b
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    mapping = {b: chr(c) for b, c in zip(bs, cs, strict=True)}
    assert set(mapping.values()) == set(byte_chars)
    vocab = {mapping[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BOS, EOS, IMAGE])
    assert tok.token_to_id(BOS) == BOS_ID and tok.token_to_id(EOS) == EOS_ID and tok.token_to_id(IMAGE) == IMAGE_ID
    return tok


def _mix(*xs: int) -> int:
    h = 0x9E3779B9
    for x in xs:
        h = (h ^ (x & 0xFFFFFFFF)) * 0x01000193 & 0xFFFFFFFF
        h ^= h >> 15
    return h


class FakeCache(SequenceCache):
    def __init__(self, model: FakeOcrModel, key: int, prompt_len: int, answer_len: int, capacity: int) -> None:
        self.model = model
        self.key = key
        self.prompt_len = prompt_len
        self.answer_len = answer_len
        self.capacity = capacity
        self._length = prompt_len
        self.last = 0
        self.released = False

    @property
    def length(self) -> int:
        return self._length

    def release(self) -> None:
        if not self.released:
            self.released = True
            with self.model._lock:
                self.model.live_caches -= 1


class FakeOcrModel(OcrModel):
    kind: ClassVar[str] = "fake"
    image_placeholder: ClassVar[str] = IMAGE

    def __init__(
        self,
        *,
        name: str = "fake",
        image_tokens: int = 4,
        max_images: int = 4,
        min_answer: int = 3,
        answer_span: int = 14,
        max_context: int = 4096,
        step_delay: float = 0.0,
        prefill_delay: float = 0.0,
        on_decode: Callable[[FakeOcrModel, int], None] | None = None,
        on_prefill: Callable[[FakeOcrModel, Prepared], None] | None = None,
        prefill_layers: int = 0,
        on_layer: Callable[[FakeOcrModel, int], None] | None = None,
        on_prepare: Callable[[FakeOcrModel, str], None] | None = None,
    ) -> None:
        self.name = name
        self.salt = zlib.crc32(name.encode())  # two fakes with different names answer differently
        self.tokenizer = build_tokenizer()
        self.eos_token_ids = frozenset({EOS_ID})
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.max_context = max_context
        self.image_tokens = image_tokens
        self.max_images = max_images
        self.min_answer = min_answer
        self.answer_span = answer_span
        self.step_delay = step_delay
        self.prefill_delay = prefill_delay
        self.on_decode = on_decode
        self.on_prefill = on_prefill
        self.prefill_layers = prefill_layers
        self.on_layer = on_layer
        self.on_prepare = on_prepare
        self.layers_run = 0  # prefill layers run in total (a cancelled prefill stops early)
        self.in_prefill = False
        self.decodes_during_prefill = 0
        self.quantized: str | None = None
        # observation counters (tests)
        self._lock = threading.Lock()
        self.live_caches = 0
        self.prefill_calls = 0
        self.decode_calls = 0
        self.batch_sizes: list[int] = []
        # a fixed random-looking score for every (letter, slot) so that sampling has a distribution
        g = torch.Generator().manual_seed(self.salt)
        self._noise = torch.rand(64, len(LETTERS), generator=g) * 4.0

    # --- loading -------------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        files: ModelFiles,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.bfloat16,
        quantize: str | None = None,
    ) -> FakeOcrModel:
        """Options come from ``config.json`` (keys = constructor arguments, see :func:`write_fake_checkpoint`)."""
        try:
            opts = json.loads(Path(files.config).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            from ..models.base import ModelLoadError

            raise ModelLoadError(f"fake model: cannot read {files.config}: {exc}") from exc
        if opts.pop("fail", None):
            from ..models.base import ModelLoadError

            raise ModelLoadError(f"fake model: configured to fail ({files.config})")
        opts.pop("model_type", None)
        model = cls(**opts)
        if quantize not in SUPPORTED_QUANTIZE:
            raise ValueError(f"unsupported quantize {quantize!r}")
        model.quantized = quantize
        return model

    # --- protocol ------------------------------------------------------------------------------
    def prepare(
        self,
        text: str,
        images: list[Image.Image],
        settings: RequestOptions | None = None,
        system: str | None = None,
    ) -> Prepared:
        if self.on_prepare is not None:
            self.on_prepare(self, text)
        if len(images) > self.max_images:
            raise InputError(f"too many images: {len(images)} (this model takes at most {self.max_images})")
        markers = text.count(IMAGE)
        if markers and markers != len(images):
            raise InputError(f"the prompt has {markers} {IMAGE} markers but {len(images)} images were given")
        if not markers:
            text = IMAGE * len(images) + text
        full = (system + "\n" if system else "") + text
        ids = [BOS_ID]
        for tid in self.tokenizer.encode(full, add_special_tokens=False).ids:
            ids.extend([IMAGE_ID] * self.image_tokens if tid == IMAGE_ID else [tid])
        check_prompt_fits(len(ids), self.max_context)
        keys = [self._image_key(im) for im in images]
        return Prepared(ids, {"image_keys": keys})

    @staticmethod
    def _image_key(image: Image.Image) -> int:
        thumb = image.convert("RGB").resize((8, 8))
        return zlib.crc32(thumb.tobytes()) ^ (image.width << 16) ^ image.height

    def prompt_key(self, prepared: Prepared) -> int:
        return _mix(self.salt, *prepared.input_ids, *prepared.inputs.get("image_keys", []))

    def answer_length(self, prepared: Prepared) -> int:
        """Number of letters the greedy answer has before its EOS."""
        return self.min_answer + self.prompt_key(prepared) % max(1, self.answer_span)

    def prefill(
        self, prepared: Prepared, max_new_tokens: int, between_layers: BetweenLayers = no_pause
    ) -> tuple[torch.Tensor, FakeCache]:
        if self.on_prefill is not None:
            self.on_prefill(self, prepared)
        self.in_prefill = True
        try:
            for layer in range(self.prefill_layers):
                time.sleep(self.prefill_delay / self.prefill_layers)
                self.layers_run += 1
                if self.on_layer is not None:
                    self.on_layer(self, layer)
                between_layers()
            if self.prefill_delay and not self.prefill_layers:
                time.sleep(self.prefill_delay)
        finally:
            self.in_prefill = False
        n = prepared.num_prompt_tokens
        if n + max_new_tokens > self.max_context:
            raise InputError(f"prompt ({n}) + max_new_tokens ({max_new_tokens}) exceeds the context {self.max_context}")
        key = self.prompt_key(prepared)
        cache = FakeCache(self, key, n, self.answer_length(prepared), n + max_new_tokens)
        cache.last = prepared.input_ids[-1]
        with self._lock:
            self.live_caches += 1
            self.prefill_calls += 1
        return self._logits(cache), cache

    def decode(self, tokens: list[int], caches: list[SequenceCache]) -> torch.Tensor:
        if len(tokens) != len(caches) or not tokens:
            raise ValueError(f"decode needs one token per cache (got {len(tokens)} tokens, {len(caches)} caches)")
        with self._lock:
            self.decode_calls += 1
            self.batch_sizes.append(len(tokens))
            self.decodes_during_prefill += self.in_prefill
        if self.on_decode is not None:
            self.on_decode(self, len(tokens))
        if self.step_delay:
            time.sleep(self.step_delay)
        rows = []
        for tok, cache in zip(tokens, caches, strict=True):
            assert isinstance(cache, FakeCache)
            if cache.released:
                raise RuntimeError("decode on a released cache")
            if cache.length >= cache.capacity:
                raise RuntimeError(f"cache overrun: {cache.length} >= capacity {cache.capacity}")
            cache._length += 1
            cache.last = tok
            rows.append(self._logits(cache))
        return torch.stack(rows)

    # --- the deterministic "network" -------------------------------------------------------------
    def _target(self, cache: FakeCache) -> int:
        i = cache.length - cache.prompt_len  # index of the token being generated
        if i >= cache.answer_len:
            return EOS_ID
        return LETTERS[_mix(cache.key, i, cache.last) % len(LETTERS)]

    def _logits(self, cache: FakeCache) -> torch.Tensor:
        out = torch.full((VOCAB,), -30.0)
        i = cache.length - cache.prompt_len
        letters = torch.tensor(list(LETTERS))
        out[letters] = self._noise[_mix(cache.key, i) % self._noise.shape[0]]
        out[EOS_ID] = -5.0
        out[self._target(cache)] = 6.0
        return out

    # --- helpers for tests ---------------------------------------------------------------------
    def expected_greedy(self, prepared: Prepared, max_new_tokens: int = 10**9) -> list[int]:
        """Greedy token ids (EOS included when reached) without repetition penalty / n-gram bans."""
        cache = FakeCache(self, self.prompt_key(prepared), prepared.num_prompt_tokens, self.answer_length(prepared), 0)
        cache.last = prepared.input_ids[-1]
        out: list[int] = []
        while len(out) < max_new_tokens:
            t = self._target(cache)
            out.append(t)
            if t == EOS_ID:
                break
            cache._length += 1
            cache.last = t
        cache.released = True
        return out

    def expected_text(self, prepared: Prepared, max_new_tokens: int = 10**9) -> str:
        return bytes(t for t in self.expected_greedy(prepared, max_new_tokens) if t < 256).decode()


def write_fake_checkpoint(directory: str | Path, **options: Any) -> ModelFiles:
    """A checkpoint directory the ``fake`` kind loads: ``config.json`` (constructor options) + tokenizer."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({"model_type": "fake", **options}), encoding="utf-8")
    build_tokenizer().save(str(d / "tokenizer.json"))
    (d / "model.safetensors").write_bytes(b"")  # no weights; present so asset resolution finds a file
    return ModelFiles.from_dir(d)
