"""Property-based run of schemathesis against ``/openapi.json`` of a real server: no generated request
(valid per the schema or not) may produce a 5xx. Bounded examples, so that the suite stays quick."""

from __future__ import annotations

import pytest
from fixtures.server import RunningServer

schemathesis = pytest.importorskip("schemathesis")
hypothesis = pytest.importorskip("hypothesis")

EXAMPLES = 25  # per operation and generation mode


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_no_generated_request_gives_a_5xx(api_server: RunningServer, mode: str) -> None:
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_url(api_server.base_url + "/openapi.json")
    ops = [r.ok() for r in schema.get_all_operations()]
    assert {op.path for op in ops} >= {"/v1/chat/completions", "/v1/responses", "/v1/models", "/health"}
    seen: dict[str, int] = {}
    if mode == "negative":  # nothing to break in a GET without parameters
        ops = [op for op in ops if op.method.upper() == "POST"]
    for op in ops:
        generation_mode = schemathesis.GenerationMode(mode)

        @given(case=op.as_strategy(generation_mode=generation_mode))
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        def check(case) -> None:  # noqa: ANN001
            response = case.call(timeout=60)
            seen[case.path] = seen.get(case.path, 0) + 1
            assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])

        check()
    assert all(seen.get(op.path) for op in ops), seen
