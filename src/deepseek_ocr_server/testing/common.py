"""What every family's test-checkpoint builder shares: the tokenizer assembly, the safetensors writer,
per-key random generators and the write-a-checkpoint-folder step.

A family builder keeps what is its own: the key list of its published layout, its config.json schema,
its side files and the style of its tokenizer (byte-level BPE, SentencePiece-like BPE, one token per
character), each mimicking the real one.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Tokenizer

_DTYPE_NAMES = {torch.bfloat16: "BF16", torch.float32: "F32", torch.float16: "F16"}


def build_tokenizer(
    model: Any,
    special_tokens: Iterable[str],
    *,
    normalizer: Any = None,
    pre_tokenizer: Any = None,
    decoder: Any = None,
    path: Path | None = None,
) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` over ``model`` (a ``tokenizers.models`` instance) with the given
    normalizer / pre-tokenizer / decoder and ``special_tokens`` added as special, unnormalised tokens
    in that order; saved to ``path`` as ``tokenizer.json`` when given."""
    tok = Tokenizer(model)
    if normalizer is not None:
        tok.normalizer = normalizer
    if pre_tokenizer is not None:
        tok.pre_tokenizer = pre_tokenizer
    if decoder is not None:
        tok.decoder = decoder
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    if path is not None:
        tok.save(str(path))
    return tok


def key_generator(seed: int, key: str) -> torch.Generator:
    """A generator seeded from ``seed`` and the tensor's name: its values do not depend on which other
    tensors are written, or in which order."""
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))


def write_safetensors(
    path: Path,
    shapes: Mapping[str, tuple[int, ...]],
    make: Callable[[str, tuple[int, ...]], torch.Tensor],
    dtype: torch.dtype = torch.bfloat16,
) -> None:
    """Stream a safetensors file tensor by tensor (never more than one tensor in memory); ``make`` is
    called once per key, in ``shapes``' order, and its result cast to ``dtype``."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for k, shape in shapes.items():
        n = math.prod(shape) * itemsize
        header[k] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for k, shape in shapes.items():
            t = make(k, shape).to(dtype).contiguous()
            assert tuple(t.shape) == tuple(shape), k
            f.write(t.view(torch.uint8).numpy().tobytes())


def write_checkpoint(
    directory: str | Path,
    shapes: Mapping[str, tuple[int, ...]],
    make: Callable[[str, tuple[int, ...]], torch.Tensor],
    dtype: torch.dtype,
    side_files: Callable[[Path], None],
    *,
    weights_name: str = "model.safetensors",
    shards: int = 1,
) -> Path:
    """A checkpoint folder: ``side_files(folder)`` (config.json, tokenizer.json, ...), then the weights,
    written under a temporary name and renamed last (a folder with its weights file is complete), or as
    ``shards`` files plus a ``model.safetensors.index.json``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    side_files(d)
    if shards <= 1:
        tmp = d / (weights_name + ".tmp")
        write_safetensors(tmp, shapes, make, dtype)
        tmp.rename(d / weights_name)
        return d
    keys = sorted(shapes)
    weight_map = {}
    for i in range(shards):
        part = keys[i::shards]
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        write_safetensors(d / name, {k: shapes[k] for k in part}, make, dtype)
        weight_map.update(dict.fromkeys(part, name))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    return d


def tiny_layout(
    shapes: dict[str, tuple[int, ...]],
    omit: tuple[str, ...] = (),
    extra: Mapping[str, tuple[int, ...]] | None = None,
    reshape: Mapping[str, tuple[int, ...]] | None = None,
) -> dict[str, tuple[int, ...]]:
    """``shapes`` corrupted on purpose for loading-error tests: ``reshape`` changes shapes, ``extra``
    adds keys, ``omit`` drops keys."""
    out = dict(shapes)
    out.update(reshape or {})
    out.update(extra or {})
    return {k: s for k, s in out.items() if k not in omit}


def random_checkpoint(
    directory: str | Path,
    shapes: Mapping[str, tuple[int, ...]],
    random: Callable[[str, tuple[int, ...], torch.Generator, float], torch.Tensor],
    side_files: Callable[[Path], None],
    *,
    seed: int,
    scale: float,
    dtype: torch.dtype,
) -> Path:
    """:func:`write_checkpoint` (one ``model.safetensors``) with ``random(key, shape, gen, scale)``
    drawing from ONE generator in key order (the PaddleOCR-VL and GLM-OCR builders)."""
    gen = torch.Generator().manual_seed(seed)
    return write_checkpoint(directory, shapes, lambda k, s: random(k, s, gen, scale), dtype, side_files)


def is_complete(directory: str | Path) -> bool:
    """Whether a folder already holds a checkpoint :func:`random_checkpoint` finished."""
    d = Path(directory)
    return (d / "model.safetensors").is_file() and (d / "config.json").is_file()
