"""Models loaded cold, through edged and in-process: what the budget charges, what a load costs.

The subjects are an ONNX model whose weights dominate (a 16 MiB MatMul) and two tiny-llama
GGUFs: the default size, where llama.cpp's fixed costs dominate, and a larger one with a 2k
context, where the KV cache and compute buffers do. Each is declared as a user would, not
preloaded, so the benchmarks choose when it loads.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import psutil

from bench.harness import timed
from bench.llm import LARGE, STREAM_TIMEOUT_S, TINY, GgufFile, declaration, generate_edged, prompt
from edged.client import Client
from edged.config import GgufOptions, OnnxOptions
from edged.demo import DEMO_FEATURES, build_demo_model
from edged.models.budget import give_back_freed_memory
from edged.models.calls import Sampling
from edged.models.gguf import GgufBackend, GgufEmbedder, GgufGenerator
from edged.models.onnx import OnnxBackend
from edged.testing import DaemonProcess

#: the 16 MiB ONNX model: one float32 MatMul of WIDE x WIDE
WIDE = 2048
#: tokens in the prompt of a light generate request
LIGHT_PROMPT_TOKENS = 8
#: a worst-case prompt leaves this many tokens of the context for its generation
WORST_CASE_HEADROOM = 8
#: a cold-loaded model is unloaded this long after its last request (at the daemon's next
#: 1 s tick): long enough that the warm request after a cold one always finds it loaded
KEEP_ALIVE_S = 0.5
UNLOAD_TIMEOUT_S = 10.0


class Subject(Protocol):
    """A model to load cold: how to build and declare it and to send it requests, through
    edged and in-process."""

    @property
    def name(self) -> str: ...

    @property
    def filename(self) -> str: ...

    @property
    def primer(self) -> Subject:
        """A small model of the same backend, loaded first: the backend's one-time costs
        (library import, runtime set-up) are then paid before the subject's footprint is."""

    def build(self, path: Path) -> Path: ...

    def declaration(self, path: Path) -> dict[str, object]: ...

    def request(self, client: Client, lead: int) -> None:
        """The cheapest request; ``lead`` varies it (a prompt's first word)."""

    def worst_case(self, client: Client) -> None:
        """The request that touches the most memory the model will ever use."""

    def load(self, path: Path) -> Any:
        """The backend load the daemon performs, in this process."""

    def run(self, loaded: Any, lead: int) -> None:
        """``request``, on what ``load`` returned."""


@dataclass(frozen=True)
class OnnxSubject:
    """A model of one input "x", float32[batch, width]."""

    name: str
    filename: str
    builder: Callable[[Path], Path]
    width: int

    @property
    def primer(self) -> Subject:
        return ONNX_PRIMER

    def build(self, path: Path) -> Path:
        return self.builder(path)

    def declaration(self, path: Path) -> dict[str, object]:
        return {"path": str(path)}

    def inputs(self) -> dict[str, np.ndarray[Any, Any]]:
        return {"x": np.ones((1, self.width), np.float32)}

    def request(self, client: Client, lead: int) -> None:
        client.infer(self.name, self.inputs())

    def worst_case(self, client: Client) -> None:
        self.request(client, 0)

    def load(self, path: Path) -> OnnxBackend:
        return OnnxBackend.load(path, OnnxOptions())

    def run(self, loaded: OnnxBackend, lead: int) -> None:
        loaded.run(self.inputs())


@dataclass(frozen=True)
class GgufSubject:
    """A tiny-llama GGUF served with ``options``."""

    name: str
    file: GgufFile
    options: GgufOptions

    @property
    def filename(self) -> str:
        return self.file.filename

    @property
    def primer(self) -> Subject:
        return GGUF_PRIMER

    def build(self, path: Path) -> Path:
        return self.file.build(path)

    def declaration(self, path: Path) -> dict[str, object]:
        return declaration(path, self.options, preload=False)

    def request(self, client: Client, lead: int) -> None:
        generate_edged(client, self.name, prompt(lead, LIGHT_PROMPT_TOKENS), max_tokens=1)

    def worst_case(self, client: Client) -> None:
        """A prompt that nearly fills the context: the KV cache and compute buffers in use."""
        tokens = self.options.n_ctx - WORST_CASE_HEADROOM
        stream = client.generate(self.name, prompt(0, tokens), max_tokens=4, temperature=0.0)
        completion = stream.text()
        if completion.prompt_tokens != tokens:
            raise RuntimeError(f"the worst-case prompt is {completion.prompt_tokens} tokens")

    def load(self, path: Path) -> GgufGenerator | GgufEmbedder:
        return GgufBackend.load(path, self.options)

    def run(self, loaded: GgufGenerator | GgufEmbedder, lead: int) -> None:
        text = prompt(lead, LIGHT_PROMPT_TOKENS)
        sampling = Sampling(max_tokens=1, temperature=0.0, top_p=1.0, seed=0)
        for _ in loaded.stream(loaded.tokenize(text), sampling):
            pass


def build_wide_model(path: Path) -> Path:
    """x float32[batch, WIDE] -> y, one MatMul: the weights are all there is to it."""
    from onnx import TensorProto, helper, numpy_helper, save

    weight = np.random.default_rng(0).standard_normal((WIDE, WIDE), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "wide",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", WIDE])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", WIDE])],
        initializer=[numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    save(model, path)
    return path


ONNX_PRIMER = OnnxSubject("primer", "tiny.onnx", build_demo_model, DEMO_FEATURES)
GGUF_PRIMER = GgufSubject("primer", TINY, GgufOptions(n_ctx=64, n_threads=1))
SUBJECTS: tuple[Subject, ...] = (
    OnnxSubject("wide_onnx", "wide.onnx", build_wide_model, WIDE),
    GgufSubject("tiny_llama", TINY, GgufOptions(n_ctx=512, n_threads=1)),
    GgufSubject("large_llama_ctx2048", LARGE, GgufOptions(n_ctx=2048, n_threads=1)),
)


def charged_and_used(
    workdir: Path, subject: Subject, path: Path, primer_path: Path
) -> tuple[int, int]:
    """What the daemon charges for the model, and the RSS it really added once in use.

    A fresh daemon loads the primer, then the subject, which then serves its worst case; its
    RSS grew by what the subject uses (the page cache it maps included: that is resident too).
    """
    primer = subject.primer
    models = {subject.name: subject.declaration(path), primer.name: primer.declaration(primer_path)}
    with DaemonProcess(workdir, {"models": models}) as daemon:
        process = psutil.Process(daemon.pid)
        with daemon.client(timeout=STREAM_TIMEOUT_S) as client:
            primer.request(client, 0)
            before = process.memory_info().rss
            subject.worst_case(client)
            used = process.memory_info().rss - before
            charged = int(client.ping()["memory"]["models"][subject.name]["charged_bytes"])
    return charged, used


def cold_load_ms(
    workdir: Path, paths: Mapping[Subject, Path], rounds: int
) -> dict[str, tuple[float, float]]:
    """Per subject, the median cold-start cost in ms through edged and in-process.

    The cost is the time of the first request to a model that is not loaded minus that of the
    next, warm one, on both sides: through edged the request loads the model on the way; in
    this process it is the backend's load followed by the request's run. Files are in the page
    cache for both. An extra first round, not counted, pays the one-time costs (importing
    llama.cpp, setting up its backend) on both sides. The sides take turns round by round.
    """
    models = {s.name: {**s.declaration(p), "keep_alive_s": KEEP_ALIVE_S} for s, p in paths.items()}
    spans: dict[str, tuple[list[float], list[float]]] = {s.name: ([], []) for s in paths}
    daemon = DaemonProcess(workdir, {"models": models})
    with daemon, daemon.client(timeout=STREAM_TIMEOUT_S) as client:
        for round_ in range(rounds + 1):
            lead = 2 * round_
            for subject in paths:
                cold = timed(partial(subject.request, client, lead))()
                warm = timed(partial(subject.request, client, lead + 1))()
                spans[subject.name][0].append(cold - warm)
            _wait_unloaded(client)
            for subject, path in paths.items():
                spans[subject.name][1].append(_cold_minus_warm(subject, path, lead))
    return {
        name: (_median_ms(edged[1:]), _median_ms(direct[1:]))
        for name, (edged, direct) in spans.items()
    }


def _cold_minus_warm(subject: Subject, path: Path, lead: int) -> float:
    started = time.perf_counter()
    loaded = subject.load(path)
    subject.run(loaded, lead)
    cold = time.perf_counter() - started
    warm = timed(partial(subject.run, loaded, lead + 1))()
    loaded.close()
    give_back_freed_memory()  # as the daemon does on unload: the next load faults pages in anew
    return cold - warm


def _wait_unloaded(client: Client) -> None:
    """Until the daemon has unloaded every model for idleness."""
    deadline = time.monotonic() + UNLOAD_TIMEOUT_S
    while client.ping()["loaded"]:
        if time.monotonic() > deadline:
            raise TimeoutError(f"models still loaded after {UNLOAD_TIMEOUT_S:.0f} s")
        time.sleep(0.05)


def _median_ms(spans: list[float]) -> float:
    return statistics.median(spans) * 1e3
