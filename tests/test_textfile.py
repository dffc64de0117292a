"""Fleet telemetry through node_exporter: ``edgectl textfile`` writes the daemon's metrics into
the textfile collector's directory, and the real node_exporter (Debian's
prometheus-node-exporter) serves them with no scrape error; a daemon that is down is written
as ``edged_up 0``, not as its last figures."""

from __future__ import annotations

import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from edged.textfile import textfile
from tests.conftest import EDGECTL, DaemonFactory, free_port

NODE_EXPORTER = shutil.which("prometheus-node-exporter") or shutil.which("node_exporter")


def samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((sample.labels, sample.value))
    return found


def test_process_metrics_are_renamed_and_up_is_added() -> None:
    exposition = (
        "# HELP process_open_fds Number of open file descriptors.\n"
        "# TYPE process_open_fds gauge\nprocess_open_fds 12.0\n"
        "# HELP edged_uptime_seconds Seconds\n# TYPE edged_uptime_seconds gauge\n"
        "edged_uptime_seconds 3.0\n"
    )
    found = samples(textfile(exposition))
    assert found["edged_process_open_fds"] == [({}, 12.0)] and "process_open_fds" not in found
    assert found["edged_up"] == [({}, 1.0)] and found["edged_uptime_seconds"] == [({}, 3.0)]
    assert samples(textfile(None)) == {"edged_up": [({}, 0.0)]}


@pytest.mark.skipif(
    NODE_EXPORTER is None, reason="needs prometheus-node-exporter (make installs it)"
)
def test_node_exporter_serves_the_daemons_metrics(
    start_daemon: DaemonFactory, tmp_path: Path
) -> None:
    assert NODE_EXPORTER is not None
    daemon = start_daemon()  # no models declared: the demo serves
    with daemon.client() as client:
        for _ in range(3):
            client.infer("demo", {"x": np.zeros((1, 16), np.float32)})
    directory = tmp_path / "textfile"
    directory.mkdir()
    target = directory / "edged.prom"

    def write() -> int:
        command = [*EDGECTL, "--control", daemon.control_endpoint, "--timeout", "3"]
        done = subprocess.run([*command, "textfile", str(target)], check=False, timeout=60)
        return done.returncode

    assert write() == 0
    port = free_port()
    exporter = subprocess.Popen(
        [
            *(NODE_EXPORTER, "--collector.disable-defaults", "--collector.textfile"),
            f"--collector.textfile.directory={directory}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        scraped = scrape(port)
        requests = dict(
            (labels["version"], value) for labels, value in scraped["edged_requests_total"]
        )
        assert requests == {"1": 3.0}
        assert scraped["edged_up"] == [({}, 1.0)]
        assert scraped["edged_process_resident_memory_bytes"][0][1] > 0
        assert scraped["node_textfile_scrape_error"] == [({}, 0.0)]
        daemon.stop()
        assert write() == 1  # the daemon is down: said so, not its last figures
        scraped = scrape(port)
        assert scraped["edged_up"] == [({}, 0.0)] and "edged_requests_total" not in scraped
        assert scraped["node_textfile_scrape_error"] == [({}, 0.0)]
    finally:
        exporter.terminate()
        exporter.wait(10)


def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    """node_exporter's /metrics, once it answers."""
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as page:
                return samples(page.read().decode())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
