"""Metrics and per-model figures: what the control socket reports matches what was sent."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from edged.config import parse_config
from edged.errors import ConfigError, ShapeMismatch
from tests.conftest import DaemonFactory, free_port

GOOD = {"x": np.zeros((1, 16), np.float32)}
BAD = {"x": np.zeros((1, 15), np.float32)}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_parse_and_count_what_was_sent(
    start_daemon: DaemonFactory, models_dir: Path
) -> None:
    demo = {"path": str(models_dir / "demo.onnx"), "preload": True}
    daemon = start_daemon({"models": {"demo": demo}, "memory": {"budget_mb": 100}})
    with daemon.client() as client:
        for _ in range(12):
            client.infer("demo", GOOD)
        for _ in range(3):
            with pytest.raises(ShapeMismatch):
                client.infer("demo", BAD)
    with daemon.control() as control:
        found = samples(control.command("metrics")["text"])
        models = control.command("models")["models"]["demo"]
    version = (("model", "demo"), ("version", "1"))
    assert found["edged_requests_total", version] == 12
    assert found["edged_request_errors_total", (("code", "SHAPE_MISMATCH"), ("model", "demo"))] == 3
    total = (*version[:1], ("stage", "total"), version[1])
    assert found["edged_request_duration_seconds_count", total] == 12
    assert found["edged_request_duration_seconds_bucket", (("le", "+Inf"), *total)] == 12
    assert found["edged_model_loaded", (*version[:1], ("role", "active"), version[1])] == 1
    assert found["edged_memory_budget_bytes", (("kind", "capacity"),)] == 100 * 2**20
    assert found["process_resident_memory_bytes", ()] > 0
    traffic = models["versions"]["1"]
    assert traffic["requests"] == 12 and traffic["latency"]["p50_us"] > 0
    assert models["errors"] == {"SHAPE_MISMATCH": 3}
    assert models["memory"]["charged_bytes"] > 0


def test_prometheus_scrapes_the_loopback_http_endpoint(
    start_daemon: DaemonFactory, models_dir: Path
) -> None:
    address = f"127.0.0.1:{free_port()}"
    demo = {"path": str(models_dir / "demo.onnx"), "preload": True}
    daemon = start_daemon({"models": {"demo": demo}, "metrics": {"http": address}})
    with daemon.client() as client:
        for _ in range(4):
            client.infer("demo", GOOD)
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        found = samples(response.read().decode())
    assert found["edged_requests_total", (("model", "demo"), ("version", "1"))] == 4


def test_metrics_http_must_stay_on_loopback() -> None:
    with pytest.raises(ConfigError, match="loopback"):
        parse_config({"metrics": {"http": "0.0.0.0:9464"}}, "edged.toml", Path())
