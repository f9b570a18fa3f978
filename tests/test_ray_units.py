"""Cluster mode pieces that need no Ray: the ``[models.entries.X.ray]`` settings and flags, the error
record sent from replicas, the metrics merge, and that the default code path never imports Ray."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from deepseek_ocr_server.cli import settings_from_args
from deepseek_ocr_server.config import ConfigError, RayDeploymentSettings, load_settings
from deepseek_ocr_server.engine.errors import BadRequest, EngineError, ModelUnavailable, Overloaded
from deepseek_ocr_server.rayserve import metrics as ray_metrics
from deepseek_ocr_server.rayserve.wire import Rejected

SRC = Path(__file__).parents[1] / "src"


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "config.toml"
    p.write_text(textwrap.dedent(text), encoding="utf-8")
    return p


def test_ray_table_per_model_and_flags_over_it(tmp_path: Path) -> None:
    cfg = _write(
        tmp_path,
        """
        [models.entries.deepseek-ocr.ray]
        min_replicas = 2
        max_replicas = 6
        num_cpus = 4
        target_ongoing_requests = 6
        """,
    )
    s = load_settings({}, cfg)
    assert s.ray_for("deepseek-ocr") == RayDeploymentSettings(2, 6, 4.0, 0.0, 6.0)
    assert s.ray_for("paddleocr-vl") == RayDeploymentSettings()
    s = settings_from_args(
        ["--config", str(cfg), "--ray-num-cpus", "0.5", "--ray-max-replicas", "8", "--ray"]
    )
    assert s.ray_for("deepseek-ocr") == RayDeploymentSettings(2, 8, 0.5, 0.0, 6.0)
    assert s.ray_for("paddleocr-vl").num_cpus == 0.5


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("min_replicas = -1", "models.entries.deepseek-ocr.ray.min_replicas: must be >= 0, got -1"),
        ("num_cpus = 'two'", "models.entries.deepseek-ocr.ray.num_cpus: expected a number"),
        (
            "replicas = 2",
            "models.entries.deepseek-ocr.ray.replicas: unknown key (did you mean 'min_replicas'?",
        ),
        ("target_ongoing_requests = 0", "target_ongoing_requests: must be > 0.0"),
    ],
)
def test_ray_table_bad_values_name_the_key(tmp_path: Path, body: str, message: str) -> None:
    cfg = _write(tmp_path, f"[models.entries.deepseek-ocr.ray]\n{body}\n")
    with pytest.raises(ConfigError) as exc:
        load_settings({}, cfg)
    assert message in str(exc.value)


def test_ray_bounds_checked_as_a_whole(tmp_path: Path) -> None:
    cfg = _write(tmp_path, "[models.entries.deepseek-ocr.ray]\nmin_replicas = 3\nmax_replicas = 2\n")
    with pytest.raises(ConfigError, match=r"max_replicas \(2\) is below min_replicas \(3\)"):
        load_settings({}, cfg).ray_for("deepseek-ocr")


def test_ray_flag_bad_value_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        settings_from_args(["--config", str(tmp_path / "c.toml"), "--ray-min-replicas", "-2"])
    assert exc.value.code == 2
    assert "--ray-min-replicas: must be >= 0, got -2" in capsys.readouterr().err


def test_rejected_round_trip_keeps_fields() -> None:
    e = Rejected.from_error(Overloaded("busy", retry_after=7.0)).to_error()
    assert isinstance(e, Overloaded) and e.retry_after == 7.0 and e.status == 429
    e = Rejected.from_error(BadRequest("bad top_p", param="top_p")).to_error()
    assert isinstance(e, BadRequest) and e.param == "top_p" and e.status == 400
    e = Rejected.from_error(ModelUnavailable("no weights")).to_error()
    assert isinstance(e, ModelUnavailable) and e.status == 503 and e.message == "no weights"
    e = Rejected.from_error(ValueError("boom")).to_error()
    assert type(e) is EngineError and e.status == 500 and "ValueError: boom" in e.message


def test_metrics_merge_labels_each_replica() -> None:
    def replica_text(tokens: int) -> str:
        reg = CollectorRegistry()
        Counter("ocr_generated_tokens_total", "Tokens generated", ["model"], registry=reg).labels("m").inc(
            tokens
        )
        Gauge("ocr_queue_depth", "Requests waiting", registry=reg).set(tokens % 3)
        Counter("ocr_requests_total", "stale copy", ["endpoint", "status"], registry=reg)
        return generate_latest(reg).decode()

    local = CollectorRegistry()
    Counter("ocr_requests_total", "HTTP requests", ["endpoint", "status"], registry=local).labels(
        "/x", "200"
    ).inc()
    Gauge("ocr_queue_depth", "idle copy in the ingress", registry=local).set(99)
    out = ray_metrics.merge(
        generate_latest(local),
        [
            ({"model": "m", "replica": "r1"}, replica_text(5)),
            ({"model": "m", "replica": "r2"}, replica_text(7)),
        ],
    ).decode()
    fams = {f.name: f for f in text_string_to_metric_families(out)}
    assert out.count("# TYPE ocr_generated_tokens_total counter") == 1
    toks = {
        s.labels["replica"]: s.value
        for s in fams["ocr_generated_tokens"].samples
        if s.name.endswith("_total")
    }
    assert toks == {"r1": 5.0, "r2": 7.0}
    depth = {s.labels.get("replica"): s.value for s in fams["ocr_queue_depth"].samples}
    assert depth == {"r1": 2.0, "r2": 1.0}  # the ingress's idle 99 is not reported
    reqs = [s for s in fams["ocr_requests"].samples if s.name == "ocr_requests_total"]
    assert [(s.labels, s.value) for s in reqs] == [({"endpoint": "/x", "status": "200"}, 1.0)]


_NO_RAY = """
import sys, types, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("ray is blocked in this test")
        return None
sys.meta_path.insert(0, Block())
"""


def test_default_path_never_imports_ray(tmp_path: Path) -> None:
    code = _NO_RAY + textwrap.dedent(f"""
        from pathlib import Path
        from deepseek_ocr_server.config import load_settings
        from deepseek_ocr_server.server import build_app
        from deepseek_ocr_server import cli
        cli.build_parser()
        s = load_settings({{}}, Path({str(tmp_path / "c.toml")!r}))
        app, manager = build_app(s)
        from fastapi.testclient import TestClient
        with TestClient(app) as c:
            assert c.get("/health").json()["state"] == "idle"
            assert c.get("/v1/models").status_code == 200
            assert c.get("/metrics").status_code == 200
        assert not [m for m in sys.modules if m == "ray" or m.startswith("ray.")]
        print("ok")
    """)
    env = {"PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")


def test_ray_flag_without_ray_installed_is_a_clear_error(tmp_path: Path) -> None:
    code = _NO_RAY + textwrap.dedent(f"""
        from deepseek_ocr_server.cli import main
        sys.exit(main(["--ray", "--config", {str(tmp_path / "c.toml")!r}]))
    """)
    env = {"PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2
    assert "--ray needs Ray Serve: pip install 'deepseek-ocr-server[ray]'" in out.stderr
