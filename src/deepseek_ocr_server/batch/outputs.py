"""Where a document's results go, whether they are already there, and writing them atomically.

Per document ``OUTDIR/<name>``:

- ``--format md`` (default): ``<name>.md`` (clean markdown, pages separated), ``<name>.json`` (the
  structured blocks per page, the API's schema), ``<name>_images/`` (figure crops the markdown links
  to, only when there are figures), and with ``--boxes`` ``<name>_boxes/page-0001.png``... (each page
  with its blocks drawn);
- ``--format raw``: ``<name>.txt``, the model's raw text of every page.

Every file is written to a temporary name beside it and renamed into place, folders are filled under a
temporary name and swapped in, and the main file (``.md`` / ``.txt``) comes last: a document whose main
file exists is complete. An interrupted run leaves no partial file under a final name.

Resume: a document is up to date when its main file (and, for ``md``, its ``.json``; with ``--boxes``
its boxes folder) exist and the main file is not older than the input.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .inputs import Doc

FORMATS = ("md", "raw")


@dataclass
class DocumentOutput:
    """Everything written for one document (bytes ready to write; ``json_text`` None in raw format)."""

    main_text: str
    json_text: str | None = None
    images: dict[str, bytes] = field(default_factory=dict)  # file name -> bytes, under <name>_images/
    boxes: dict[str, bytes] = field(default_factory=dict)  # file name -> bytes, under <name>_boxes/


def main_path(base: Path, fmt: str) -> Path:
    return base.with_name(base.name + (".md" if fmt == "md" else ".txt"))


def json_path(base: Path) -> Path:
    return base.with_name(base.name + ".json")


def images_dir(base: Path) -> Path:
    return base.with_name(base.name + "_images")


def boxes_dir(base: Path) -> Path:
    return base.with_name(base.name + "_boxes")


def up_to_date(doc: Doc, fmt: str, boxes: bool) -> bool:
    """True when the document's outputs exist and are not older than its input (resume)."""
    if doc.source is None or doc.out_base is None:
        return False
    main = main_path(doc.out_base, fmt)
    try:
        if main.stat().st_mtime < doc.source.stat().st_mtime:
            return False
    except OSError:
        return False
    if fmt == "md" and not json_path(doc.out_base).is_file():
        return False
    return not (boxes and not boxes_dir(doc.out_base).is_dir())


def _tmp(path: Path, what: str = "tmp") -> Path:
    return path.with_name(f".{path.name}.{what}-{os.getpid()}")


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def replace_dir_atomic(path: Path, files: dict[str, bytes]) -> None:
    """Make ``path`` a folder holding exactly ``files`` (none: remove it), swapped in as a whole."""
    old = _tmp(path, "old")
    if not files:
        if path.is_dir():
            os.replace(path, old)
            shutil.rmtree(old, ignore_errors=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        if path.is_dir():
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def write_document(doc: Doc, out: DocumentOutput, fmt: str, boxes: bool) -> Path:
    """Write one document's outputs (main file last). Returns the main file's path."""
    assert doc.out_base is not None
    base = doc.out_base
    if fmt == "md":
        replace_dir_atomic(images_dir(base), out.images)
        if boxes:
            replace_dir_atomic(boxes_dir(base), out.boxes)
        assert out.json_text is not None
        write_atomic(json_path(base), out.json_text.encode("utf-8"))
    main = main_path(base, fmt)
    write_atomic(main, out.main_text.encode("utf-8"))
    return main
