"""The model-family registry: every fact about a family, declared once in its own folder.

A family is a package ``models/<family>/`` whose ``spec.py`` defines ``SPEC`` (one :class:`FamilySpec`,
or ``SPECS``, a tuple of them). The registry finds them by scanning the ``models`` package (no list of
families anywhere else), so adding a family is adding a folder::

    models/<family>/
        __init__.py     # a docstring saying what the model is
        spec.py         # SPEC = FamilySpec(kind=..., model="...model:MyModel", repo=..., prompts=..., ...)
        model.py        # class MyModel(OcrModel): load / prepare / prefill / decode
        ...             # config.py, processor.py, vision.py, language.py as the family needs
    testing/<family>.py # build_tiny_checkpoint(directory): a random-weight checkpoint in the original layout
    tests/test_<family>_*.py

What reads the specs: ``config`` (the built-in ``[models.entries.<id>]``, the kind's inference defaults and
default prompt, the default config file), the CLI (``--model`` help), the API (``/v1/models``, which
request options a model reads), ``documents.postprocess`` (which post-processor cleans its text), and the
families' own ``load`` (the modules kept out of int8 quantization).

``spec.py`` must stay light (no torch import): listing the families never loads model code; ``model``
names the class as ``"module:Class"`` and is imported on first use. :func:`register` adds a spec at run
time (a plug-in, a test's throwaway family).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

#: the torch-free spec of the deterministic test model (``testing/fake.py``), always registered so that
#: a config file can name ``kind = "fake"``
_TEST_SPEC_MODULES = ("deepseek_ocr_server.testing.spec",)


@dataclass(frozen=True)
class FamilySpec:
    """Everything the rest of the server knows about one model family.

    - ``kind``: the family's name (``kind = "..."`` in a config entry); its built-in entry has this id.
    - ``title``: the display name; ``model``: ``"module:Class"`` of its :class:`~.base.OcrModel`.
    - ``repo``: Hugging Face repo of the built-in entry (None: no built-in entry, e.g. the test model).
    - ``default_prompt``: the task prompt of a request with an image but no text; ``prompts``: the task
      prompts the model was trained on (documentation, the config file's comment).
    - ``defaults``: inference defaults of this family over the shared ones (keys of ``settings``), e.g.
      ``{"no_repeat_ngram_size": 0}``; the config file and flags still override them.
    - ``options``: the request options (settings of the ``vision`` group) the model reads; the others are
      accepted and have no effect on it.
    - ``quantize_skip``: module-name components kept in full precision by ``quantize = "int8"`` (the
      vision side); :meth:`is_vision` is the predicate the family's ``load`` passes on.
    - ``postprocess``: the document post-processor of its text (``documents.postprocess``): ``grounding``,
      ``otsl`` or ``plain``.
    - ``test_checkpoint``: ``"module:function"`` building its tiny random-weight checkpoint
      (``function(directory) -> Path``).
    - ``config_comments``: extra comment lines of its entry in the default config file.
    """

    kind: str
    title: str
    model: str
    repo: str | None = None
    default_prompt: str = ""
    prompts: tuple[str, ...] = ()
    defaults: Mapping[str, Any] = field(default_factory=dict)
    options: tuple[str, ...] = ()
    quantize_skip: frozenset[str] = frozenset()
    postprocess: str = "plain"
    test_checkpoint: str | None = None
    config_comments: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))
        object.__setattr__(self, "quantize_skip", frozenset(self.quantize_skip))

    def is_vision(self, name: str) -> bool:
        """Whether a qualified parameter/module name lies under one of :attr:`quantize_skip`."""
        return not self.quantize_skip.isdisjoint(name.split("."))

    def model_class(self) -> type:
        module, _, name = self.model.partition(":")
        return getattr(importlib.import_module(module), name)

    def build_test_checkpoint(self, directory: Any, **kwargs: Any) -> Any:
        if self.test_checkpoint is None:
            raise ValueError(f"{self.kind}: no test checkpoint builder")
        module, _, name = self.test_checkpoint.partition(":")
        return getattr(importlib.import_module(module), name)(directory, **kwargs)


_families: dict[str, FamilySpec] | None = None
_registered: dict[str, FamilySpec] = {}


def _discover() -> dict[str, FamilySpec]:
    from .. import models

    found: dict[str, FamilySpec] = {}
    names = [f"{models.__name__}.{m.name}.spec" for m in pkgutil.iter_modules(models.__path__) if m.ispkg]
    for module_name in [*sorted(names), *_TEST_SPEC_MODULES]:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:  # a package without spec.py (a shared helper package)
                continue
            raise
        specs = getattr(module, "SPECS", None) or (getattr(module, "SPEC", None),)
        for spec in specs:
            if not isinstance(spec, FamilySpec):
                raise TypeError(f"{module_name}: SPEC/SPECS must be FamilySpec objects, got {spec!r}")
            if spec.kind in found:
                raise ValueError(f"model family {spec.kind!r} declared twice ({module_name})")
            found[spec.kind] = spec
    return found


def families() -> dict[str, FamilySpec]:
    """Every known family by kind: the discovered ones (sorted by package name), then registered ones."""
    global _families
    if _families is None:
        _families = _discover()
    return {**_families, **_registered}


def kinds() -> tuple[str, ...]:
    return tuple(families())


def family(kind: str) -> FamilySpec:
    try:
        return families()[kind]
    except KeyError:
        raise ValueError(f"unknown model kind {kind!r}; known: {', '.join(families())}") from None


def builtin_families() -> list[FamilySpec]:
    """Families with a built-in model entry (a repo to download from), in a stable order."""
    return [s for s in families().values() if s.repo]


def readers(option: str) -> list[str]:
    """The built-in families that read a request option (``base_size`` -> DeepSeek-OCR's two)."""
    return [f.kind for f in builtin_families() if option in f.options]


def register(spec: FamilySpec) -> None:
    """Add (or replace) a family at run time."""
    _registered[spec.kind] = spec


def unregister(kind: str) -> None:
    _registered.pop(kind, None)


def rescan() -> None:
    """Forget the discovered families (the next lookup scans the ``models`` package again)."""
    global _families
    _families = None


__all__ = [
    "FamilySpec",
    "builtin_families",
    "families",
    "family",
    "kinds",
    "readers",
    "register",
    "rescan",
    "unregister",
]
