"""Shared fixtures: models built once per session, and real daemons in subprocesses."""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from edged.demo import build_demo_model, build_image_model
from edged.store import ModelStore
from edged.testing import DaemonProcess
from tests.models import build_slow_model

#: fixtures that build or serve GGUF models: their tests need the gguf extra
GGUF_FIXTURES = frozenset({"gguf_models", "wide_llms"})
HAS_GGUF = all(importlib.util.find_spec(name) is not None for name in ("llama_cpp", "gguf"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Without the gguf extra (a Jetson install with --no-gguf), GGUF tests are skipped with
    the reason, never errors; ``make test`` installs the extra, so they run there."""
    if HAS_GGUF:
        return
    skip = pytest.mark.skip(reason="needs the gguf extra: pip install 'edged[gguf]'")
    for item in items:
        uses = set(getattr(item, "fixturenames", ()))
        if item.get_closest_marker("gguf") is not None or uses & GGUF_FIXTURES:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    build_demo_model(root / "demo.onnx")
    build_image_model(root / "image.onnx")
    build_slow_model(root / "slow.onnx")
    return root


@pytest.fixture(scope="session")
def silero_model() -> Path:
    spec = importlib.util.find_spec("silero_vad")  # locate without importing (it imports torch)
    assert spec is not None and spec.origin is not None, "silero-vad is not installed"
    path = Path(spec.origin).parent / "data" / "silero_vad.onnx"
    assert path.is_file(), f"silero-vad ships no {path}"
    return path


DaemonFactory = Callable[..., DaemonProcess]
Connect = Callable[..., zmq.Socket[Any]]


@pytest.fixture
def start_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonFactory]:
    """Start daemons on short IPC paths; every one is stopped (then killed) at teardown."""
    started: list[DaemonProcess] = []

    def start(
        config: dict[str, Any] | None = None, workdir: Path | None = None, **kwargs: Any
    ) -> DaemonProcess:
        daemon = DaemonProcess(workdir or tmp_path_factory.mktemp("d"), config, **kwargs)
        started.append(daemon)
        return daemon.start()

    yield start
    for daemon in started:
        try:
            daemon.stop()
        finally:
            daemon.kill()


@pytest.fixture
def demo_daemon(start_daemon: DaemonFactory, models_dir: Path) -> DaemonProcess:
    return start_daemon({"models": {"demo": {"path": str(models_dir / "demo.onnx")}}})


@pytest.fixture
def connect() -> Iterator[Callable[..., zmq.Socket[Any]]]:
    """Raw sockets connected to a daemon, for tests that speak the protocol by hand; each is
    closed with linger 0 when the test ends (warnings are errors, so a leak fails the test)."""
    context: zmq.Context[Any] = zmq.Context()
    sockets: list[zmq.Socket[Any]] = []

    def connect(endpoint: str, kind: int = zmq.DEALER) -> zmq.Socket[Any]:
        sock = context.socket(kind)
        sockets.append(sock)
        sock.connect(endpoint)
        return sock

    yield connect
    for sock in sockets:
        sock.close(linger=0)
    context.term()


def slow_config(models_dir: Path, **overrides: Any) -> dict[str, Any]:
    """The slow model, loaded at start and run on its thread: runs long enough to hold a queue."""
    model = {"path": str(models_dir / "slow.onnx"), "inline_max_us": 0, "preload": True}
    model.update(overrides)
    return {"models": {"slow": model}}


@pytest.fixture(scope="session")
def gguf_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny llama GGUFs quantized by llama.cpp: the generative model in two quantizations, an
    embedding model, and a wider one (about 12 MiB) for budget tests."""
    from edged.tinyllama import build_tiny_llama

    root = tmp_path_factory.mktemp("gguf")
    return {
        "q8": build_tiny_llama(root / "tiny.q8_0.gguf", quantize="Q8_0"),
        "q4": build_tiny_llama(root / "tiny.q4_0.gguf", quantize="Q4_0", seed=1),
        "embed": build_tiny_llama(root / "embed.q8_0.gguf", quantize="Q8_0", seed=2),
    }


def direct_embeddings(path: Path, texts: list[str]) -> Any:
    """What llama.cpp itself gives for ``texts``, mean-pooled: what edged's embed must equal."""
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=512,
        embedding=True,
        pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
        verbose=False,
    )
    try:
        return np.asarray(llm.embed(texts), np.float32)
    finally:
        llm.close()


def llm_config(path: Path, **overrides: Any) -> dict[str, Any]:
    """A GGUF model entry: loaded at start, a small context, one compute thread."""
    gguf = {"n_ctx": 512, "n_threads": 1, **overrides.pop("gguf", {})}
    return {"path": str(path), "preload": True, "gguf": gguf, **overrides}


def store_versions(daemon_dir: Path, name: str, files: list[Path], **golden: Path) -> ModelStore:
    """Store ``files`` as versions 1, 2, ... of ``name`` in a daemon directory's state, each
    with its golden vectors (by file name) when given; before the daemon starts."""
    store = ModelStore(daemon_dir / "state" / "models")
    for file in files:
        store.add(name, file, "gguf" if file.suffix == ".gguf" else "onnx", golden.get(file.name))
    return store


def free_port() -> int:
    """A TCP port free on loopback right now (for daemons configured with TCP endpoints)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


#: edgectl as an operator runs it: a separate process
EDGECTL = [sys.executable, "-c", "from edged.edgectl import main; raise SystemExit(main())"]


def edgectl_json(daemon: DaemonProcess, *args: str) -> Any:
    """Run ``edgectl --json ARGS`` against a daemon's control socket; its parsed output."""
    command = [*EDGECTL, "--control", daemon.control_endpoint, "--json", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)
    return json.loads(done.stdout)
