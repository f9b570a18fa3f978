"""Model families. Each family lives in ``models/<family>/`` and declares itself in its ``spec.py``
(:mod:`.registry` finds them); the family's class implements :class:`~.base.OcrModel`.

Imports are lazy so that listing kinds never imports torch-heavy modules.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .registry import family

if TYPE_CHECKING:  # the registry is read without importing torch
    from .base import ModelFiles, OcrModel


def model_class(kind: str) -> type[OcrModel]:
    return family(kind).model_class()


def load_model(kind: str, files: ModelFiles, **kwargs: object) -> OcrModel:
    """``cls.load(files, device=, dtype=, quantize=)``. ``dtype`` None means auto: a family that takes a
    per-phase plan (``precision_plans = True``: its load calls ``check_load_options`` for the plan and
    ``layers.storage_dtypes`` / ``layers.prepare_for_inference``) gets it; any other family gets the
    plan's compute dtype for everything."""
    cls = model_class(kind)
    if kwargs.get("dtype") is None and not getattr(cls, "precision_plans", False):
        from .precision import resolve_precision

        kwargs["dtype"] = resolve_precision(None, kwargs.get("device", "cpu")).compute_dtype
    return cls.load(files, **kwargs)  # type: ignore[arg-type]
