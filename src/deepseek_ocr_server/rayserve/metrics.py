"""``/metrics`` in cluster mode: this process's metrics (the ingress counts HTTP requests) plus every
model replica's engine metrics, each sample labelled with its ``model`` deployment and ``replica``.

Prometheus wants one ``# TYPE`` block per metric family, so the texts are parsed and merged family by
family rather than concatenated.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client import generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector, CollectorRegistry

#: families the ingress records itself; every other ``ocr_*`` family comes from the replicas
INGRESS_FAMILIES = {"ocr_requests"}


class _Merged(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        yield from self._families


def merge(local: bytes, replicas: Iterable[tuple[dict[str, str], str]]) -> bytes:
    """``local``: this process's exposition; ``replicas``: (extra labels, exposition) per replica.
    Returns one exposition: the local non-engine families, then every engine family with the samples
    of all replicas, each sample carrying its replica's labels."""
    out: dict[str, Metric] = {}
    for fam in text_string_to_metric_families(local.decode()):
        if fam.name.startswith("ocr_") and fam.name not in INGRESS_FAMILIES:
            continue  # the ingress's engine metrics are idle copies: the replicas hold the real ones
        out[fam.name] = fam
    for labels, text in replicas:
        for fam in text_string_to_metric_families(text):
            if not fam.name.startswith("ocr_") or fam.name in INGRESS_FAMILIES:
                continue
            merged = out.get(fam.name)
            if merged is None:
                merged = out[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            for s in fam.samples:
                merged.samples.append(s._replace(labels={**s.labels, **labels}))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged(list(out.values())))
    return generate_latest(registry)
