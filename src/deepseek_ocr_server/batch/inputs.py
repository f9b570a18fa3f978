"""Which documents a run has: command-line INPUTs (files, folders, globs, ``-``) -> :class:`Doc` list.

- A file named on the command line is taken whatever its extension (the renderer reports what it
  cannot read); a folder contributes every file below it (recursively, sorted) whose extension is in
  :data:`EXTENSIONS` (hidden files and this command's own ``NAME_images/`` / ``NAME_boxes/`` output
  folders left out); anything else is tried as a glob pattern (``**`` recurses).
- Outputs mirror the input's place: a named file or a glob match ``a/b.pdf`` -> ``OUTDIR/b``, a file
  ``sub/x.png`` inside a folder input -> ``OUTDIR/sub/x``. Two inputs that would share an output name
  (``a.png`` and ``a.pdf`` side by side) keep their extension in it (``a.png``, ``a.pdf``); the same
  file name from two folders gets a counter (``x.png``, ``x.png-2``).
- ``-`` reads one document from stdin; its markdown (or raw text) goes to stdout.
- A name that is neither a file, a folder nor a matching glob becomes a failed input (reported, the run
  goes on); a file met twice is processed once.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path

#: extensions a folder or glob contributes (lower case): page images, multi-page TIFF, PDF
EXTENSIONS = (".pdf", ".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")

STDIN = "-"


class UsageError(Exception):
    """Bad command-line use (exit status 2)."""


@dataclass
class Doc:
    """One input document. ``source`` is None for stdin (``data`` holds its bytes); ``out_base`` is the
    output path without suffix (``OUTDIR/sub/name``), None when the result goes to stdout."""

    name: str  # what messages call it: the path as typed/found, or "<stdin>"
    source: Path | None
    out_base: Path | None
    data: bytes | None = None
    error: str | None = None  # set when the input itself is missing

    @property
    def to_stdout(self) -> bool:
        return self.out_base is None


def _has_magic(text: str) -> bool:
    return glob.has_magic(text)


#: folders this command writes beside a document's ``NAME.md`` (see :mod:`.outputs`)
_OUTPUT_FOLDERS = ("_images", "_boxes")


def _is_output_folder(parent: Path, name: str) -> bool:
    """``NAME_images/`` or ``NAME_boxes/`` next to a ``NAME.md``/``NAME.json``: our own outputs (when the
    output folder is inside an input folder), never inputs."""
    for suffix in _OUTPUT_FOLDERS:
        if name.endswith(suffix):
            stem = name[: -len(suffix)]
            return any((parent / f"{stem}{ext}").is_file() for ext in (".md", ".json"))
    return False


def _folder_files(folder: Path) -> list[Path]:
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not _is_output_folder(Path(root), d))
        for f in sorted(files):
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in EXTENSIONS:
                found.append(Path(root) / f)
    return found


def discover(inputs: list[str], outdir: Path) -> list[Doc]:
    """The documents named by ``inputs``, in command-line order. Raises :class:`UsageError` for ``-``
    mixed with other inputs, or when no input is given."""
    if not inputs:
        raise UsageError("no INPUT given")
    if STDIN in inputs:
        if len(inputs) > 1:
            raise UsageError("'-' (stdin) cannot be combined with other inputs")
        return [Doc(name="<stdin>", source=None, out_base=None)]

    found: list[tuple[str, Path, Path]] = []  # (display name, source, output path relative to outdir)
    missing: list[Doc] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_file():
            found.append((item, path, Path(path.name)))
        elif path.is_dir():
            for f in _folder_files(path):
                found.append((str(f), f, f.relative_to(path)))
        elif _has_magic(item):
            matches = sorted(glob.glob(os.path.expanduser(item), recursive=True))
            files: list[Path] = []
            for m in matches:
                mp = Path(m)
                if mp.is_file():
                    files.append(mp)
                elif mp.is_dir():
                    files.extend(_folder_files(mp))
            if not files:
                missing.append(
                    Doc(name=item, source=None, out_base=None, error="no file matches this pattern")
                )
            for f in files:
                found.append((str(f), f, Path(f.name)))
        else:
            missing.append(Doc(name=item, source=None, out_base=None, error="no such file or directory"))

    # one document per file, first mention wins
    seen: set[Path] = set()
    unique = []
    for name, src, rel in found:
        key = src.resolve()
        if key not in seen:
            seen.add(key)
            unique.append((name, src, rel))

    stems: dict[Path, int] = {}
    for _, _, rel in unique:
        k = rel.parent / rel.stem
        stems[k] = stems.get(k, 0) + 1
    docs = []
    used: set[Path] = set()
    for name, src, rel in unique:
        k = rel.parent / rel.stem
        base = k if stems[k] == 1 else rel  # collisions keep their extension: a.png, a.pdf
        n = 2
        while base in used:  # the same file name from two folders: x.png, x.png-2
            base = rel.parent / f"{rel.name}-{n}"
            n += 1
        used.add(base)
        docs.append(Doc(name=name, source=src, out_base=outdir / base))
    return docs + missing
