"""Strict loading of original safetensors checkpoints, shared by every model family.

One pass per step::

    weight_files(path)            the .safetensors file, or the shards a *.safetensors.index.json names
    read_headers(files)           name, dtype, shape and byte range of every tensor (no tensor data read)
    match_layout(entries, ...)    the strict check against the model's {name: shape}: renames, ignored
                                  keys, tied keys; ONE error naming every missing / unexpected /
                                  mis-shaped / duplicated key
    read_tensors(plan, dtype)     each tensor read once, straight into memory the process owns, in the
                                  target dtype (per-key overrides)

:func:`load_checkpoint` chains the four and returns a state dict for
``module.load_state_dict(state, strict=True, assign=True)`` on a module built on the ``meta`` device.

Why positional reads into owned memory and not a memory map (measured on the full models): weights left
memory-mapped made the first request ~5x slower in vision and prefill, and copying out of a mapping
doubles peak RSS while the mapped pages are resident. Each tensor is read (``preadv``, a few reader
threads) straight into its final buffer, or through a small scratch chunk when its dtype changes, so the
peak is the model size plus a few 32 MiB chunks. Full DeepSeek-OCR bf16 on 2 cores: 2.7-3.1 s, peak RSS
6.62 GiB (the old mmap + copy_ loader: 3.0-3.4 s, 7.29 GiB).
"""

from __future__ import annotations

import json
import os
import re
import struct
import threading
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from .base import ModelLoadError

#: safetensors dtype name -> (torch dtype, bytes per element).
_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "BOOL": (torch.bool, 1),
    "U8": (torch.uint8, 1),
    "I8": (torch.int8, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "I16": (torch.int16, 2),
    "U16": (torch.uint16, 2),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I32": (torch.int32, 4),
    "U32": (torch.uint32, 4),
    "F32": (torch.float32, 4),
    "F64": (torch.float64, 8),
    "I64": (torch.int64, 8),
    "U64": (torch.uint64, 8),
}
#: A header larger than this is not a checkpoint header (safetensors itself caps it at 100 MB).
_MAX_HEADER = 100 << 20
#: Name lists in the error message are cut after this many entries.
_LIST_LIMIT = 12
#: Threads reading tensors at once (two already roughly halve the load time on two cores).
_READERS = max(1, min(4, os.cpu_count() or 1))
#: Bytes converted per step when a tensor changes dtype on the way in (the scratch buffer per reader).
_CHUNK = 32 << 20


@dataclass(frozen=True, slots=True)
class TensorEntry:
    """One tensor as its file's header describes it."""

    file: Path
    key: str  #: the name stored in the file
    dtype: str  #: safetensors dtype name ("BF16", ...)
    shape: tuple[int, ...]
    offset: int  #: absolute byte offset of the data in ``file``
    nbytes: int


# ------------------------------------------------------------------------------------------ files


def weight_files(weights: Path) -> list[Path]:
    """The files holding the tensors: ``weights`` itself, or every shard its index names (sorted)."""
    weights = Path(weights)
    if weights.name.endswith(".index.json"):
        try:
            index = json.loads(weights.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot read shard index {weights}: {exc}") from exc
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise ModelLoadError(f"bad shard index {weights}: no 'weight_map' object")
        names = set(weight_map.values())
        if not names:
            raise ModelLoadError(f"bad shard index {weights}: 'weight_map' lists no files")
        if not all(isinstance(n, str) and n for n in names):
            raise ModelLoadError(f"bad shard index {weights}: 'weight_map' values must be file names")
        files = [weights.parent / n for n in sorted(names)]
    else:
        files = [weights]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ModelLoadError(f"weights file not found: {', '.join(missing)}")
    return files


def _header(path: Path) -> list[TensorEntry]:
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) != 8:
                raise ValueError("file too short for a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, _MAX_HEADER):
                raise ValueError(f"header length {n} does not fit the file ({size} bytes)")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        data_start, data_size = 8 + n, size - 8 - n
        out = []
        for key, meta in header.items():
            if key == "__metadata__":
                continue
            dtype, shape, (begin, end) = meta["dtype"], tuple(meta["shape"]), meta["data_offsets"]
            if not all(isinstance(d, int) and d >= 0 for d in shape):
                raise ValueError(f"{key}: bad shape {list(shape)}")
            if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= data_size):
                raise ValueError(f"{key}: data offsets [{begin}, {end}] outside the data ({data_size} bytes)")
            if dtype in _DTYPES and end - begin != torch.Size(shape).numel() * _DTYPES[dtype][1]:
                raise ValueError(f"{key}: {end - begin} bytes for {dtype} {list(shape)}")
            out.append(TensorEntry(path, key, dtype, shape, data_start + begin, end - begin))
        return out
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"cannot read safetensors file {path}: {exc}") from exc


def read_headers(files: Iterable[Path]) -> list[TensorEntry]:
    """Every tensor of every file, in file order; only the headers are read."""
    return [e for f in files for e in _header(f)]


# ----------------------------------------------------------------------------------- strict check


def _fmt(items: list[str]) -> str:
    shown = ", ".join(items[:_LIST_LIMIT])
    return shown + (f", ... ({len(items) - _LIST_LIMIT} more)" if len(items) > _LIST_LIMIT else "")


def _where(e: TensorEntry) -> str:
    return f"{e.key} in {e.file.name}"


def match_layout(
    entries: Iterable[TensorEntry],
    expected: Mapping[str, tuple[int, ...]],
    *,
    source: Path | str,
    model: str,
    renames: Iterable[tuple[re.Pattern[str], str]] = (),
    ignored: Iterable[re.Pattern[str]] = (),
    tied: Mapping[str, str] | None = None,
) -> dict[str, TensorEntry]:
    """Map each expected name to its tensor, or raise ONE :class:`ModelLoadError` naming every problem.

    A stored key is first rewritten by every ``renames`` ``(pattern, replacement)`` in order (older or
    newer names of the same tensor), then dropped when an ``ignored`` pattern matches (``search``) the
    rewritten name. ``tied`` maps names that may be absent to the name whose tensor they then share
    (``{"lm_head.weight": "model.embed_tokens.weight"}``). Problems: missing (expected, absent, not
    tied), unexpected (stored, neither expected nor ignored; named as stored), wrong shapes and tensors
    stored twice (the same key in two shards, or under an old and a new name).
    """
    renames, ignored, tied = list(renames), list(ignored), dict(tied or {})
    found: dict[str, TensorEntry] = {}
    unexpected: list[str] = []
    twice: list[str] = []
    for e in entries:
        name = e.key
        for pattern, replacement in renames:
            name = pattern.sub(replacement, name)
        if any(p.search(name) for p in ignored):
            continue
        if name not in expected:
            unexpected.append(e.key)
        elif name in found:
            twice.append(f"{name} ({_where(found[name])}, {_where(e)})")
        else:
            found[name] = e
    missing = sorted(k for k in expected if k not in found and k not in tied)
    wrong = sorted(
        f"{k} (checkpoint {list(e.shape)}, expected {list(expected[k])})"
        for k, e in found.items()
        if e.shape != tuple(expected[k])
    )
    problems = []
    if missing:
        problems.append(f"missing tensors: {_fmt(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_fmt(sorted(unexpected))}")
    if wrong:
        problems.append(f"wrong shapes: {_fmt(wrong)}")
    if twice:
        problems.append(f"tensors stored twice: {_fmt(sorted(twice))}")
    if problems:
        raise ModelLoadError(f"checkpoint {source} does not match the {model} layout: " + "; ".join(problems))
    return found


# ---------------------------------------------------------------------------------------- reading


if hasattr(os, "preadv"):

    def _pread_into(fd: int, buf: memoryview, offset: int) -> int:
        return os.preadv(fd, [buf], offset)

else:  # Windows has no positional reads: seek + read under a lock (threads share the fds)
    _SEEK_LOCK = threading.Lock()

    def _pread_into(fd: int, buf: memoryview, offset: int) -> int:
        with _SEEK_LOCK:
            os.lseek(fd, offset, os.SEEK_SET)
            data = os.read(fd, min(len(buf), 1 << 30))
        buf[: len(data)] = data
        return len(data)


def _read_exact(fd: int, path: Path, offset: int, buf: memoryview) -> None:
    """Fill ``buf`` from byte ``offset`` of the open file ``fd`` (positional reads: threads share fds)."""
    done = 0
    while done < len(buf):  # one read returns at most ~2 GiB on Linux
        got = _pread_into(fd, buf[done:], offset + done)
        if not got:
            raise ModelLoadError(f"{path}: truncated at byte {offset + done}")
        done += got


def _bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.view(-1).view(torch.uint8).numpy())


class _Reader:
    """One reader thread's state: a scratch buffer for tensors that change dtype on the way in."""

    def __init__(self, fds: Mapping[Path, int]) -> None:
        self.fds = fds
        self.scratch = torch.empty(0, dtype=torch.uint8)

    def fill(self, e: TensorEntry, src: torch.dtype, out: torch.Tensor, check: bool) -> bool:
        """Read ``e`` into ``out``, converting ``_CHUNK`` bytes at a time from ``src``; with ``check``,
        stop and return False at the first chunk that does not convert to finite values."""
        fd = self.fds[e.file]
        if src == out.dtype:
            if e.nbytes:
                _read_exact(fd, e.file, e.offset, _bytes(out))
            return True
        if self.scratch.numel() < min(e.nbytes, _CHUNK):
            self.scratch = torch.empty(min(e.nbytes, _CHUNK), dtype=torch.uint8)
        size = src.itemsize
        step = _CHUNK // size
        flat = out.view(-1)
        for i in range(0, flat.numel(), step):
            n = min(step, flat.numel() - i)
            raw = self.scratch[: n * size]
            _read_exact(fd, e.file, e.offset + i * size, memoryview(raw.numpy()))
            part = flat[i : i + n]
            part.copy_(raw.view(src))
            if check and not bool(torch.isfinite(torch.stack(torch.aminmax(part))).all()):
                return False  # (aminmax: no chunk-sized temporary, and NaN/inf propagate to it)
        return True


def read_tensors(
    plan: Mapping[str, TensorEntry],
    dtype: torch.dtype,
    overrides: Mapping[str, torch.dtype] | None = None,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """Read each planned tensor once into freshly allocated memory in ``overrides.get(name, dtype)``.

    A tensor stored in its target dtype is read straight into its final buffer; any other is read in
    ``_CHUNK``-byte pieces through a small scratch buffer and converted into its final buffer. An override
    that does not convert to finite values (a weight outside float16's range) falls back to ``dtype``
    (that tensor alone is then read a second time). Integer tensors are only accepted in exactly the
    target dtype. ``_READERS`` threads read disjoint tensors (``preadv`` and the conversions release the
    GIL); with ``device`` each tensor moves there as soon as it is read. Peak host memory: the tensors
    plus ``_READERS`` scratch chunks.
    """
    overrides = overrides or {}
    dev = torch.device(device) if device is not None else None
    jobs: list[tuple[str, TensorEntry, torch.dtype, torch.dtype]] = []
    for name, e in plan.items():
        src = _DTYPES.get(e.dtype, (None, 0))[0]
        want = overrides.get(name, dtype)
        if src is None or not (src.is_floating_point or src == want):
            raise ModelLoadError(f"{e.key} in {e.file}: unsupported dtype {e.dtype} (for {want})")
        jobs.append((name, e, src, want))
    jobs.sort(key=lambda j: (str(j[1].file), j[1].offset))  # each reader goes forward through the files
    fds: dict[Path, int] = {}
    local = threading.local()

    def read(job: tuple[str, TensorEntry, torch.dtype, torch.dtype]) -> tuple[str, torch.Tensor]:
        name, e, src, want = job
        reader = getattr(local, "reader", None) or _Reader(fds)
        local.reader = reader
        t = torch.empty(e.shape, dtype=want)
        if not reader.fill(e, src, t, check=want != dtype):
            t = torch.empty(e.shape, dtype=dtype)
            reader.fill(e, src, t, check=False)
        return name, t if dev is None or dev.type == "cpu" else t.to(dev)

    try:
        for _, e, _, _ in jobs:
            if e.file not in fds:
                fds[e.file] = os.open(e.file, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        with ThreadPoolExecutor(max_workers=_READERS, thread_name_prefix="weights") as pool:
            return dict(pool.map(read, jobs))
    except OSError as exc:
        raise ModelLoadError(f"cannot read weights: {exc}") from exc
    finally:
        for fd in fds.values():
            os.close(fd)


def load_checkpoint(
    weights: Path,
    expected: Mapping[str, tuple[int, ...]],
    dtype: torch.dtype,
    *,
    model: str,
    renames: Iterable[tuple[re.Pattern[str], str]] = (),
    ignored: Iterable[re.Pattern[str]] = (),
    tied: Mapping[str, str] | None = None,
    overrides: Mapping[str, torch.dtype] | None = None,
    device: torch.device | str | None = None,
    unread: re.Pattern[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Strictly read ``weights`` (file or shard index) into ``{name: tensor}`` for exactly ``expected``.

    See :func:`match_layout` (``renames``, ``ignored``, ``tied``; ``model`` names the layout in the
    error) and :func:`read_tensors` (``dtype``, per-key ``overrides``, ``device``). An absent tied key
    shares its source's tensor. Keys ``unread`` matches (``search``) are checked like every other one
    but their data is not read (the result leaves them out).
    """
    weights = Path(weights)
    tied = dict(tied or {})
    plan = match_layout(
        read_headers(weight_files(weights)),
        expected,
        source=weights,
        model=model,
        renames=renames,
        ignored=ignored,
        tied=tied,
    )
    if unread is not None:
        plan = {k: e for k, e in plan.items() if not unread.search(k)}
    state = read_tensors(plan, dtype, overrides, device)
    for name, source in tied.items():
        if name not in state and source in state:
            state[name] = state[source]
    return state
