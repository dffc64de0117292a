"""Metrics and per-model figures: what the control socket reports matches what was sent."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from edged.errors import ShapeMismatch
from tests.conftest import DaemonFactory

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
