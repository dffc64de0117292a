"""Metrics and per-model figures: what the control socket reports matches what was sent."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import msgpack
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from edged.config import parse_config
from edged.errors import ConfigError, ShapeMismatch, UnknownRequest
from edged.testing import DaemonProcess
from tests.conftest import Connect, DaemonFactory, free_port, llm_config

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


def runs(daemon: DaemonProcess, model: str) -> dict[str, float]:
    """The version 1 runs of ``model`` by mode (inline, threaded), from the metrics."""
    with daemon.control() as control:
        found = samples(control.command("metrics")["text"])
    return {
        mode: found[("edged_runs_total", (("mode", mode), ("model", model), ("version", "1")))]
        for mode in ("inline", "threaded")
    }


def test_a_request_far_larger_than_the_recent_ones_runs_on_the_models_thread(
    start_daemon: DaemonFactory, models_dir: Path
) -> None:
    """A tiny model runs inline once its runs are quick; a 100 000-row request to it would
    hold the event loop for tens of milliseconds, so it goes to the model's thread."""
    demo = {"path": str(models_dir / "demo.onnx"), "preload": True, "inline_max_us": 5000}
    daemon = start_daemon({"models": {"demo": demo}})
    with daemon.client(timeout=60) as client:
        for _ in range(20):
            client.infer("demo", GOOD)
        before = runs(daemon, "demo")
        assert before["inline"] >= 10, before  # quick runs moved inline (the first never is)
        big = client.infer("demo", {"x": np.ones((100_000, 16), np.float32)})
        assert big["probs"].shape == (100_000, 4)
        after_big = runs(daemon, "demo")
        client.infer("demo", GOOD)
        after_small = runs(daemon, "demo")
    assert after_big == {"inline": before["inline"], "threaded": before["threaded"] + 1}
    assert after_small["inline"] == before["inline"] + 1  # one outlier moved the estimate little


@pytest.mark.gguf
def test_a_late_cancel_is_answered_but_not_counted_as_an_error(
    start_daemon: DaemonFactory, gguf_models: dict[str, Path], connect: Connect
) -> None:
    """Cancelling a generation that has just finished is a race every streaming client can
    lose: UNKNOWN_REQUEST on the wire, as the protocol says, but no error in the figures."""
    daemon = start_daemon({"models": {"llm": llm_config(gguf_models["q8"])}})
    sock = connect(daemon.endpoint)
    request = {"v": 1, "id": 1, "op": "generate", "model": "llm", "prompt": "hi", "max_tokens": 2}
    sock.send(msgpack.packb(request))
    while msgpack.unpackb(sock.recv()).get("more"):
        pass  # the generation has ended with its final reply
    sock.send(msgpack.packb({"v": 1, "id": 2, "op": "cancel", "target": 1}))
    assert msgpack.unpackb(sock.recv())["error"]["code"] == UnknownRequest.code
    with daemon.control() as control:
        found = samples(control.command("metrics")["text"])
        status = control.command("status")
    codes = {dict(labels).get("code") for name, labels in found if name.startswith("edged_req")}
    assert UnknownRequest.code not in codes
    assert status["errors"] == 0


def test_regions_are_counted_in_the_metrics(start_daemon: DaemonFactory, models_dir: Path) -> None:
    from edged.errors import RegionLimit

    demo = {"path": str(models_dir / "demo.onnx")}
    daemon = start_daemon({"models": {"demo": demo}, "server": {"max_regions": 2}})
    with daemon.client() as client, daemon.control() as control:
        client.region(8192, "a")
        client.region(4096, "b")
        with pytest.raises(RegionLimit):
            client.region(4096, "c")
        found = samples(control.command("metrics")["text"])
    assert found["edged_regions", ()] == 2
    assert found["edged_region_mapped_bytes", ()] == 12288
    assert found["edged_region_registrations_total", (("outcome", "registered"),)] == 2
    assert found["edged_region_registrations_total", (("outcome", "refused"),)] == 1
