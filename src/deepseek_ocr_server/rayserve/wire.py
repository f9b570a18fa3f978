"""What a model replica sends back besides engine events: an engine error raised before the first
event, as a plain record (exception objects do not survive the trip with their fields: ``param`` and
``retry_after`` are keyword state that pickling an exception drops)."""

from __future__ import annotations

from dataclasses import dataclass

from ..engine.errors import BadRequest, EngineError, ModelUnavailable, Overloaded, QueueTimeout, UnknownModel

_KINDS: dict[str, type[EngineError]] = {
    cls.__name__: cls
    for cls in (EngineError, BadRequest, UnknownModel, ModelUnavailable, Overloaded, QueueTimeout)
}


@dataclass(frozen=True)
class Rejected:
    """An :class:`EngineError` in transit (replica -> ingress)."""

    kind: str
    message: str
    param: str | None = None
    retry_after: float | None = None

    @classmethod
    def from_error(cls, exc: BaseException) -> Rejected:
        if isinstance(exc, EngineError):
            kind = type(exc).__name__ if type(exc).__name__ in _KINDS else "EngineError"
            return cls(kind, exc.message, exc.param, getattr(exc, "retry_after", None))
        return cls("EngineError", f"internal error in the model replica: {type(exc).__name__}: {exc}")

    def to_error(self) -> EngineError:
        cls = _KINDS.get(self.kind, EngineError)
        if cls is Overloaded:
            return Overloaded(self.message, retry_after=self.retry_after or 1.0)
        return cls(self.message, param=self.param)
