"""Cluster mode on a real local Ray cluster (2 CPUs, fractional replicas): the HTTP ingress answers as
the single-process server does, streams, cancels, reports every replica, and survives a replica kill.

Models: ``fake-a`` (2 replicas), ``fake-slow`` (long slow answers), ``fake-broken`` (its load fails),
``deepseek-ocr`` (a tiny random checkpoint of the real family). Limits: 2 running + 2 queued per replica.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("ray.serve")

import ray  # noqa: E402
from fixtures.server import (  # noqa: E402
    REAL_VISION,
    RunningServer,
    data_url,
    fake_settings,
    free_port,
    png_bytes,
    serve,
)
from ray import serve as ray_serve  # noqa: E402

from deepseek_ocr_server.config import ModelEntry, Settings  # noqa: E402
from deepseek_ocr_server.models.base import ModelFiles  # noqa: E402

pytestmark = pytest.mark.ray

LIMITS = {"max_running": 2, "max_queued": 2}
TIMEOUT = httpx.Timeout(120.0)


@dataclass
class Cluster:
    base_url: str
    settings: Settings

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=TIMEOUT)


def _settings(root: Path, fake_checkpoints: dict[str, ModelFiles], deepseek_ckpt: Path) -> Settings:
    ckpts = {m: fake_checkpoints[m] for m in ("fake-a", "fake-slow", "fake-broken")}
    s = fake_settings(root, ckpts, **LIMITS)
    files = ModelFiles.from_dir(deepseek_ckpt)
    models = dict(s.models)
    models["deepseek-ocr"] = ModelEntry(
        id="deepseek-ocr",
        kind="deepseek-ocr",
        config=files.config,
        tokenizer=files.tokenizer,
        weights=files.weights,
        overrides={**REAL_VISION, "max_new_tokens": 8},
    )
    # fractional CPUs: five model replicas and the ingress fit a 2-CPU Ray instance
    models = {
        m: replace(e, ray={"num_cpus": 0.2, "min_replicas": 2 if m == "fake-a" else 1})
        for m, e in models.items()
    }
    return replace(s, models=models)


@pytest.fixture(scope="module")
def ray_settings(
    fake_checkpoints: dict[str, ModelFiles], deepseek_ckpt: Path, tmp_path_factory: pytest.TempPathFactory
) -> Settings:
    return _settings(tmp_path_factory.mktemp("ray-app"), fake_checkpoints, deepseek_ckpt)


@pytest.fixture(scope="module")
def cluster(ray_settings: Settings) -> Iterator[Cluster]:
    from deepseek_ocr_server.rayserve.deployments import APP_NAME, build_application

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        port = free_port()
        ray_serve.start(http_options={"host": "127.0.0.1", "port": port})
        ray_serve.run(build_application(ray_settings), name=APP_NAME, route_prefix="/")
        yield Cluster(f"http://127.0.0.1:{port}", ray_settings)
    finally:
        ray_serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def single(ray_settings: Settings) -> Iterator[RunningServer]:
    """The single-process server on the same settings: the reference answers."""
    yield from serve(ray_settings)


def _chat(model: str, text: str, color: tuple[int, int, int], **kw: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": text},
                    {"type": "image_url", "image_url": {"url": data_url(png_bytes(color))}},
                ],
            }
        ],
        **kw,
    }


def _responses(model: str, text: str, color: tuple[int, int, int], **kw: Any) -> dict[str, Any]:
    return {
        "model": model,
        "input": [
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": text},
                    {"type": "input_image", "image_url": data_url(png_bytes(color))},
                ],
            }
        ],
        **kw,
    }


def _essence(path: str, status: int, body: dict[str, Any]) -> Any:
    """What must be equal between the two servers (ids and timestamps differ by nature)."""
    if status != 200:
        return status, body["error"]["type"], body["error"]["code"]
    if path.endswith("/chat/completions"):
        ch = body["choices"][0]
        return status, ch["message"]["content"], ch["finish_reason"], body["usage"]
    return status, body["output"][0]["content"][0]["text"], body["status"], body["usage"]


def _sse_text(resp: httpx.Response) -> tuple[str, list[Any]]:
    """Content of a chat stream and its parsed events."""
    events = []
    parts = []
    for line in resp.iter_lines():
        if not line.startswith("data: "):
            continue
        data = line.removeprefix("data: ")
        events.append(data if data == "[DONE]" else json.loads(data))
        if data != "[DONE]" and "choices" in events[-1] and events[-1]["choices"]:
            parts.append(events[-1]["choices"][0]["delta"].get("content") or "")
    return "".join(parts), events


def _replicas(c: httpx.Client, model: str) -> list[dict[str, Any]]:
    return c.get("/health").json()["models"][model]["replicas"]


def _wait(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def test_health_lists_every_model_and_replica(cluster: Cluster) -> None:
    with cluster.client() as c:
        h = c.get("/health").json()
    assert h["status"] == "ok" and h["mode"] == "ray"
    assert set(h["models"]) == {"fake-a", "fake-slow", "fake-broken", "deepseek-ocr"}
    a = h["models"]["fake-a"]
    assert a["state"] == "ready" and a["replica_states"] == {"RUNNING": 2}
    assert len(a["replicas"]) == 2 and {r["state"] for r in a["replicas"]} == {"ready"}
    assert len({r["replica"] for r in a["replicas"]}) == 2
    broken = h["models"]["fake-broken"]
    assert broken["state"] == "failed"
    assert "configured to fail" in broken["replicas"][0]["error"]
    assert h["models"]["deepseek-ocr"]["state"] == "ready"
    assert h["state"] == "failed"  # one model cannot load; the others serve


def test_mixed_concurrent_requests_equal_single_process(cluster: Cluster, single: RunningServer) -> None:
    jobs = [
        ("/v1/chat/completions", _chat("fake-a", "page one", (10, 20, 30))),
        ("/v1/chat/completions", _chat("fake-a", "page two", (200, 20, 30), max_tokens=5)),
        ("/v1/responses", _responses("fake-a", "page three", (10, 220, 30))),
        ("/v1/chat/completions", _chat("fake-a", "page four", (90, 90, 90), seed=3, temperature=0.8)),
        ("/v1/chat/completions", _chat("fake-slow", "slow page", (1, 2, 3), max_tokens=6)),
        ("/v1/chat/completions", _chat("deepseek-ocr", "<image>\nFree OCR.", (240, 240, 240))),
        ("/v1/responses", _responses("deepseek-ocr", "Free OCR.", (30, 60, 90), max_output_tokens=5)),
        ("/v1/chat/completions", _chat("fake-broken", "x", (0, 0, 0))),
        ("/v1/chat/completions", _chat("no-such-model", "x", (0, 0, 0))),
        ("/v1/chat/completions", {**_chat("fake-a", "x", (0, 0, 0)), "top_p": 7}),
    ]

    def run(base: str, job: tuple[str, dict[str, Any]]) -> Any:
        with httpx.Client(base_url=base, timeout=TIMEOUT) as c:
            r = c.post(job[0], json=job[1])
            return _essence(job[0], r.status_code, r.json())

    with cf.ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(lambda j: run(cluster.base_url, j), jobs))
    want = [run(single.base_url, j) for j in jobs]
    assert got == want
    assert [g[0] for g in got] == [200] * 7 + [503, 404, 400]


def test_streaming_through_the_ingress(cluster: Cluster, single: RunningServer) -> None:
    body = _chat("fake-a", "stream it", (5, 50, 150), stream=True, stream_options={"include_usage": True})
    with cluster.client() as c, c.stream("POST", "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        text, events = _sse_text(resp)
    with httpx.Client(base_url=single.base_url, timeout=TIMEOUT) as c:
        plain = c.post("/v1/chat/completions", json={**body, "stream": False}).json()
    assert text == plain["choices"][0]["message"]["content"] and text
    assert events[-1] == "[DONE]" and events[-2]["usage"] == plain["usage"]
    rbody = _responses("deepseek-ocr", "Free OCR.", (9, 9, 9), stream=True)

    def kinds(base: str) -> tuple[list[str], str]:
        with (
            httpx.Client(base_url=base, timeout=TIMEOUT) as c,
            c.stream("POST", "/v1/responses", json=rbody) as r,
        ):
            evs = [json.loads(ln[6:]) for ln in r.iter_lines() if ln.startswith("data: ")]
        return [e["type"] for e in evs], evs[-1]["response"]["output"][0]["content"][0]["text"]

    assert kinds(cluster.base_url) == kinds(single.base_url)


def test_cancel_mid_stream_frees_the_slot_and_429_beyond_the_queue(cluster: Cluster) -> None:
    with cluster.client() as c:
        body = _chat("fake-slow", "long", (7, 7, 7), stream=True, max_tokens=4000)
        with c.stream("POST", "/v1/chat/completions", json=body) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert any('"content"' in ln for ln in got)
            assert _replicas(c, "fake-slow")[0]["running"] == 1
        # the client went away: the replica's engine cancels the sequence
        _wait(lambda: _replicas(c, "fake-slow")[0]["running"] == 0, 30, "the cancelled sequence to leave")

        # 2 running + 2 queued fill the replica; one more is refused with 429 and Retry-After
        with cf.ThreadPoolExecutor(4) as pool:

            def hold() -> int:
                with (
                    httpx.Client(base_url=cluster.base_url, timeout=TIMEOUT) as hc,
                    hc.stream("POST", "/v1/chat/completions", json=body) as r,
                ):
                    for _ in r.iter_lines():
                        if done:
                            break
                    return r.status_code

            done = False
            futs = []
            for n in range(1, 5):  # one at a time: a burst could find the queue full before admissions
                futs.append(pool.submit(hold))
                _wait(
                    lambda n=n: (st := _replicas(c, "fake-slow")[0])["running"] + st["queued"] == n,
                    30,
                    f"{n} requests in the replica",
                )
            st = _replicas(c, "fake-slow")[0]
            assert (st["running"], st["queued"]) == (2, 2)
            r = c.post("/v1/chat/completions", json={**body, "stream": False})
            assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["type"] == "rate_limit_error"
            done = True
            assert [f.result(timeout=60) for f in futs] == [200] * 4
        _wait(
            lambda: (st := _replicas(c, "fake-slow")[0])["running"] == 0 and st["queued"] == 0,
            30,
            "the four streams to be cancelled",
        )
        r = c.post("/v1/chat/completions", json={**body, "stream": False, "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_metrics_keep_ours_per_replica(cluster: Cluster) -> None:
    with cluster.client() as c:
        text = c.get("/metrics").text
    assert text.count("# TYPE ocr_generated_tokens_total counter") == 1
    assert 'ocr_requests_total{endpoint="/v1/chat/completions",status="200"}' in text
    replicas = {
        ln.split('replica="')[1].split('"')[0]
        for ln in text.splitlines()
        if ln.startswith("ocr_generated_tokens_total{") and 'model="fake-a"' in ln
    }
    assert len(replicas) >= 1
    assert 'ocr_running_sequences{model="fake-a",replica=' in text


def test_killing_a_replica_mid_request_does_not_hang(cluster: Cluster) -> None:
    with cluster.client() as c:
        victim = _replicas(c, "fake-slow")[0]
        body = _chat("fake-slow", "long", (3, 3, 3), stream=True, max_tokens=4000)
        with c.stream("POST", "/v1/chat/completions", json=body) as resp:
            lines = resp.iter_lines()
            assert '"content"' in "".join(next(lines) for _ in range(4))
            ray.kill(ray.get_actor(victim["actor_name"], namespace="serve"), no_restart=True)
            rest = [ln for ln in lines if ln.startswith("data: ")]  # ends: no hang
        err = json.loads(rest[-1][6:])
        assert "error" in err and "stopped during this request" in err["error"]["message"]
        assert "[DONE]" not in "".join(rest)

        # Serve replaces the replica; later requests succeed
        _wait(
            lambda: [
                r
                for r in _replicas(c, "fake-slow")
                if r["replica"] != victim["replica"] and r["state"] == "ready"
            ],
            90,
            "a new fake-slow replica",
        )
        r = c.post("/v1/chat/completions", json={**body, "stream": False, "max_tokens": 3})
        assert r.status_code == 200

        # a fake-a replica killed while requests arrive: each ends (answer or 5xx error), none hangs
        a_victim = _replicas(c, "fake-a")[0]
        jobs = [_chat("fake-a", f"p{i}", (i, 2 * i, 3 * i)) for i in range(8)]

        def post(b: dict[str, Any]) -> int:
            with httpx.Client(base_url=cluster.base_url, timeout=TIMEOUT) as hc:
                resp = hc.post("/v1/chat/completions", json=b)
                assert resp.status_code == 200 or "error" in resp.json()
                return resp.status_code

        with cf.ThreadPoolExecutor(8) as pool:
            futs = [pool.submit(post, b) for b in jobs[:4]]
            ray.kill(ray.get_actor(a_victim["actor_name"], namespace="serve"), no_restart=True)
            futs += [pool.submit(post, b) for b in jobs[4:]]
            codes = [f.result(timeout=90) for f in futs]
        # an answer, a 429 (the survivor's queue took the retries) or a 5xx error (killed mid-answer)
        assert all(code in (200, 429) or code >= 500 for code in codes), codes
        assert 200 in codes
        _wait(
            lambda: len([r for r in _replicas(c, "fake-a") if r["state"] == "ready"]) == 2,
            90,
            "fake-a back at 2 replicas",
        )
        r = c.post("/v1/chat/completions", json=jobs[0])
        assert r.status_code == 200


def test_serve_config_example_is_valid_and_builds(tmp_path: Path) -> None:
    """The documented serve_config.yaml passes Serve's schema, and its import path builds our app."""
    import importlib

    import yaml
    from ray.serve.schema import ServeDeploySchema

    from deepseek_ocr_server.config import ConfigError

    doc = yaml.safe_load((Path(__file__).parents[1] / "examples" / "serve_config.yaml").read_text())
    schema = (
        ServeDeploySchema.model_validate(doc)
        if hasattr(ServeDeploySchema, "model_validate")
        else (ServeDeploySchema.parse_obj(doc))
    )
    app = schema.applications[0]
    module, attr = app.import_path.split(":")
    builder = getattr(importlib.import_module(module), attr)
    built = builder({"config": str(tmp_path / "config.toml")})
    names = {d.name for d in app.deployments}
    assert names == {"OcrIngress", "model-deepseek-ocr", "model-paddleocr-vl"}
    assert type(built).__name__ == "Application"
    with pytest.raises(ConfigError, match="unknown application arguments"):
        builder({"config": str(tmp_path / "config.toml"), "modle": "x"})


def test_deployment_options_from_settings(ray_settings: Settings) -> None:
    from deepseek_ocr_server.rayserve.deployments import model_deployment_options

    a = model_deployment_options(ray_settings, "fake-a")
    assert a["name"] == "model-fake-a" and a["num_replicas"] == 2 and "autoscaling_config" not in a
    assert a["ray_actor_options"] == {"num_cpus": 0.2, "num_gpus": 0.0}
    assert a["max_ongoing_requests"] == LIMITS["max_running"] + LIMITS["max_queued"] + 1
    s = replace(ray_settings, cli_ray={"max_replicas": 5})
    auto = model_deployment_options(s, "fake-a")
    assert auto["autoscaling_config"] == {
        "min_replicas": 2,
        "max_replicas": 5,
        "target_ongoing_requests": 2.0,
    }
    zero = model_deployment_options(replace(ray_settings, cli_ray={"min_replicas": 0}), "fake-slow")
    assert zero["autoscaling_config"]["min_replicas"] == 0 and zero["autoscaling_config"]["max_replicas"] == 1
