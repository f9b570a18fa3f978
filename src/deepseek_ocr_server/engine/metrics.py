"""Prometheus metrics (default registry). The API records request outcomes, the engine the rest.

``GET /metrics`` serves ``prometheus_client.generate_latest()``.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, Info

REQUESTS = Counter(
    "ocr_requests_total", "HTTP requests by endpoint and status code", ["endpoint", "status"]
)
QUEUE_DEPTH = Gauge("ocr_queue_depth", "Requests waiting for admission")
RUNNING = Gauge("ocr_running_sequences", "Sequences currently prefilling or decoding")
GENERATED_TOKENS = Counter("ocr_generated_tokens_total", "Tokens generated", ["model"])
PROMPT_TOKENS = Counter("ocr_prompt_tokens_total", "Prompt tokens prefilled (image tokens included)", ["model"])
TTFT = Histogram(
    "ocr_time_to_first_token_seconds",
    "Time from request acceptance to its first generated token",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80, 160),
)
LATENCY = Histogram(
    "ocr_request_latency_seconds",
    "End-to-end generation latency",
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80, 160, 320, 640),
)
MODEL_LOAD_SECONDS = Histogram(
    "ocr_model_load_seconds", "Model load time", ["model"], buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600)
)


def observe_request(endpoint: str, status: int) -> None:
    REQUESTS.labels(endpoint=endpoint, status=str(status)).inc()

# --- engine internals (scheduler) ------------------------------------------------------------------
QUEUE_WAIT = Histogram(
    "ocr_queue_wait_seconds",
    "Time a request waited before its prefill started (model swaps included)",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80, 160, 320),
)
BATCH_SIZE = Histogram(
    "ocr_decode_batch_size", "Sequences per decode step", buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
)
REJECTED = Counter("ocr_rejected_requests_total", "Requests refused by the engine", ["reason"])
CANCELLED = Counter("ocr_cancelled_requests_total", "Requests whose client went away before the end")
SWAPS = Counter("ocr_model_swaps_total", "Successful model loads (initial load included)")
DECODE_SECONDS = Counter(
    "ocr_decode_seconds_total", "Wall time spent in decode steps, by batch size (sequences per step)", ["batch"]
)
DECODE_STEPS = Counter("ocr_decode_steps_total", "Decode steps, by batch size", ["batch"])
STEP_GAP = Histogram(
    "ocr_decode_step_gap_seconds",
    "Time the running sequences waited between two decode steps (a prefill admitted in between, "
    "bounded by prefill_slice_s plus one layer): the engine's inter-token latency on top of a step",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40),
)
PREFILL_SECONDS = Histogram(
    "ocr_prefill_seconds",
    "Wall time of one admission: preprocessing + vision + prompt prefill",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80, 160),
)

CPU_INFO = Info(
    "ocr_cpu",
    "The detected CPU class and capabilities, and the precision plan each phase runs in (set at model load)",
)


_PRECISION: dict[str, str] = {}


def publish_cpu_info(cpu: dict, precision: dict | None = None) -> None:
    """Set ``ocr_cpu_info`` from ``cpu.CpuInfo.as_dict()`` and the loaded model's ``Precision.as_dict()``
    (kept from the last load when not given)."""
    if precision is not None:
        _PRECISION.clear()
        _PRECISION.update({f"precision_{k}": str(v) for k, v in precision.items()})
    labels = {k: str(v) for k, v in cpu.items() if k != "flags"}
    labels["flags"] = ",".join(cpu.get("flags", []))
    CPU_INFO.info({**labels, **_PRECISION})
