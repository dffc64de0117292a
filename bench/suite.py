"""The benchmarks: each takes the run's ``Context`` and returns rows against same-run baselines."""

from __future__ import annotations

import dataclasses
import functools
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, ExitStack, closing, contextmanager
from pathlib import Path
from typing import Any

import psutil

from bench import drift, frames, lifecycle, llm, llm_serving, overload, swap, vectors
from bench.echo import echo_caller
from bench.harness import (
    ROOT,
    Call,
    Row,
    ServerProcess,
    Settings,
    medians_s,
    p50s_us,
    p99_us,
    repeat_for,
)
from bench.httpjson import http_caller
from bench.llm import GENERATION, LARGE
from bench.load import CLIENTS, closed_loop_rates
from bench.mosec_peer import mosec_caller
from bench.workloads import (
    IMAGE,
    TINY,
    WORKLOADS,
    Target,
    Workload,
    edged_caller,
    open_calls,
    ort_caller,
    region_caller,
)
from edged.client import Client
from edged.config import OnnxOptions
from edged.demo import build_image_model
from edged.testing import DaemonProcess

MIB = 1024 * 1024
FLOOR = "floor (zmq echo + ort run)"
BARE_TIMEOUT_S = 60.0
#: the generation model's name in its daemon
LLM = "llm"
MAX_TOKENS = 128
#: short, so that the tokens/s rows are about generating, not evaluating the prompt
RATE_PROMPT_TOKENS = 8
TTFT_PROMPT_TOKENS = 64
#: a sentence of about 20 tokens for the text-encoder benchmark
EMBED_TEXT = "the red camera on the motor sees a part that is hot and fast, not normal"
#: streams at once in the parallel benchmark, and the model's threads there: both cores, for
#: the device's aggregate (1 thread measured 1.24x where 2 gave 1.63x); its clients mostly wait
PARALLEL = 4
PARALLEL_THREADS = 2
#: requests per slice of the overload benchmark, for the flood and the echo each
OVERLOAD_SLICE = 200


class Context:
    """Models, the daemon and the echo server, made on first use and shared by the benchmarks.

    Every process started here is entered on ``stack``, so it is stopped when the run ends,
    however it ends.
    """

    def __init__(self, settings: Settings, workdir: Path, stack: ExitStack) -> None:
        self.settings = settings
        self.workdir = workdir
        self._stack = stack
        self._models: dict[str, Path] = {}

    def built(self, filename: str, build: Callable[[Path], Path]) -> Path:
        """The model file, built on first use; benchmarks share it by name."""
        if filename not in self._models:
            self._models[filename] = build(self.workdir / filename)
        return self._models[filename]

    def model_path(self, workload: Workload) -> Path:
        return self.built(f"{workload.name}.onnx", workload.build)

    def declaration(self, workload: Workload) -> dict[str, object]:
        """The model as a user declares it; ``max_batch`` as ``edged serve`` gives its demo."""
        return {"path": str(self.model_path(workload)), "max_batch": 8, "preload": True}

    def daemon_config(self, *workloads: Workload) -> dict[str, object]:
        """Each workload's model, declared as ``declaration`` has it."""
        return {"models": {w.model: self.declaration(w) for w in workloads}}

    @functools.cached_property
    def edged(self) -> Target:
        """A daemon serving every workload's model, at edged's default model settings."""
        daemon = DaemonProcess(self.workdir, self.daemon_config(*WORKLOADS))
        return edged_caller, self._stack.enter_context(daemon).endpoint

    @functools.cached_property
    def llm_endpoint(self) -> str:
        """A daemon serving the larger tiny-llama alone, as ``GENERATION``."""
        path = self.built(LARGE.filename, LARGE.build)
        config = {"models": {LLM: llm.declaration(path, GENERATION, preload=True)}}
        daemon = DaemonProcess(self.workdir / "llm", config)
        return self._stack.enter_context(daemon).endpoint

    @contextmanager
    def llm_sides(self) -> Iterator[tuple[Client, Any]]:
        """A client of that daemon, and the same model with the same settings in this process."""
        client = Client(self.llm_endpoint, timeout=llm.STREAM_TIMEOUT_S)
        model = llm.open_llama(self.built(LARGE.filename, LARGE.build), GENERATION)
        with client, closing(model):
            yield client, model

    @functools.cached_property
    def swaps(self) -> swap.Windows:
        """The image model's steady and swapping windows, shared by the swap benchmarks.

        Its versions are the image model and the same graph built with other weights. The image
        model rather than the demo one: its 600 KB input and its run are most of a request, as a
        camera frame's would be, so a swap's load competes with real work; against the demo model's
        ~100 us round trips the ratio would mostly measure the scheduler of a busy box.
        """
        versions = [
            self.model_path(IMAGE),
            self.built("image-seed1.onnx", functools.partial(build_image_model, seed=1)),
        ]
        workdir = self.workdir / "swap"
        return swap.measure(workdir, IMAGE, self.declaration(IMAGE), versions, self.settings)

    @functools.cached_property
    def frames_endpoint(self) -> str:
        """A daemon serving the frame detector twice: "camera" with its pipeline, taking the
        frame, and "detector" bare, taking the float32 tensor a client prepared."""
        path = self.built("detector.onnx", frames.build_detector)
        camera = {"preprocess": frames.PREPROCESS, "postprocess": frames.POSTPROCESS}
        config = {
            "models": {
                "camera": {"path": str(path), "preload": True, **camera},
                "detector": {"path": str(path), "preload": True},
            }
        }
        daemon = DaemonProcess(self.workdir / "frames", config)
        return self._stack.enter_context(daemon).endpoint

    @functools.cached_property
    def echo(self) -> Target:
        """The raw echo server, the transport floor."""
        endpoint = f"ipc://{self.workdir / 'echo.sock'}"
        self._stack.enter_context(ServerProcess("bench.echo", endpoint))
        return echo_caller, endpoint

    def p50s(self, workload: Workload, targets: Mapping[str, Target]) -> dict[str, float]:
        """Median round trip in us per target, the targets taking turns (see ``p50s_us``)."""
        with ExitStack() as stack:
            return p50s_us(open_calls(stack, targets, workload), self.settings)


def rtt(ctx: Context, workload: Workload) -> list[Row]:
    """edged's round trip against its floor: the same frames echoed raw, plus the bare run.

    The two floor parts get rows of their own (ratio = their share of the floor) to show where
    the floor's time goes.
    """
    ort = (ort_caller, str(ctx.model_path(workload)))
    p50 = ctx.p50s(workload, {"edged": ctx.edged, "echo": ctx.echo, "ort": ort})
    edged, echo, run = p50["edged"], p50["echo"], p50["ort"]
    floor = echo + run
    name = f"rtt_{workload.name}"
    return [
        Row(name, "p50_rtt", "us", edged, FLOOR, floor),
        Row(f"{name}_floor_echo", "p50_rtt", "us", echo, FLOOR, floor),
        Row(f"{name}_floor_ort", "p50_run", "us", run, FLOOR, floor),
    ]


def throughput(ctx: Context) -> list[Row]:
    """Tiny requests from CLIENTS closed-loop processes: edged against the raw echo server."""
    rates = closed_loop_rates({"echo": ctx.echo, "edged": ctx.edged}, TINY, ctx.settings)
    edged, echo = rates["edged"], rates["echo"]
    return [Row(f"throughput_{CLIENTS}", "throughput", "req/s", edged, "zmq echo", echo)]


def http_json(ctx: Context) -> list[Row]:
    """The naive HTTP/JSON server against edged, per workload; ratio > 1 means edged is faster."""
    rows = []
    for workload in WORKLOADS:
        with ServerProcess("bench.httpjson", str(ctx.model_path(workload))) as server:
            p50 = ctx.p50s(workload, {"http": (http_caller, server.info), "edged": ctx.edged})
        http, edged = p50["http"], p50["edged"]
        rows.append(Row(f"http_json_{workload.name}", "p50_rtt", "us", http, "edged", edged))
    return rows


def peer_mosec(ctx: Context) -> list[Row]:
    """mosec (Rust HTTP front, one Python worker, msgpack) against edged on the tiny model:
    the round trip of one client, then the closed-loop rate of CLIENTS; ratio > 1 means edged
    is faster on both rows."""
    with ServerProcess("bench.mosec_peer", str(ctx.model_path(TINY))) as server:
        mosec: Target = (mosec_caller, server.info)
        p50 = ctx.p50s(TINY, {"mosec": mosec, "edged": ctx.edged})
        rates = closed_loop_rates({"mosec": mosec, "edged": ctx.edged}, TINY, ctx.settings)
    return [
        Row("peer_mosec_tiny", "p50_rtt", "us", p50["mosec"], "edged", p50["edged"]),
        Row(
            "peer_mosec_tiny_throughput",
            "throughput",
            "req/s",
            rates["edged"],
            "mosec",
            rates["mosec"],
        ),
    ]


def idle_rss(ctx: Context) -> list[Row]:
    """A fresh idle daemon serving the demo model against a bare process holding the same session.

    The difference is what edged itself costs in memory. A fresh daemon rather than the shared
    one, which also holds the image model and has served traffic. The delta gets no row of its
    own: its baseline would be a fixed target, not a measurement. It is exactly value -
    baseline_value, and the printed table shows it.
    """
    path = ctx.model_path(TINY)
    with DaemonProcess(ctx.workdir / "idle", ctx.daemon_config(TINY)) as daemon:
        time.sleep(ctx.settings.idle_s)
        daemon_rss = psutil.Process(daemon.pid).memory_info().rss
    bare = subprocess.run(
        [sys.executable, "-m", "bench.bare", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=BARE_TIMEOUT_S,
    )
    daemon_mib, bare_mib = daemon_rss / MIB, int(bare.stdout) / MIB
    return [Row("idle_rss", "rss", "MiB", daemon_mib, "bare python + ort session", bare_mib)]


def gguf_tokens_per_s(ctx: Context) -> list[Row]:
    """Streamed tokens/s through edged against llama-cpp-python in-process, on one model.

    A rate is MAX_TOKENS over the median time from sending a short prompt to the last token
    (in-process: from tokenizing it), so a row also carries the prompt's evaluation and edged's
    time to first token, alike on both sides. Two baselines: the loop the daemon runs
    (``Llama.generate``, each token detokenized), and ``create_completion(stream=True)``.
    """
    with ctx.llm_sides() as (client, model):
        calls = llm.whole_generations(client, LLM, model, RATE_PROMPT_TOKENS, MAX_TOKENS)
        p50 = p50s_us(calls, ctx.settings)
    rates = {label: MAX_TOKENS / (us / 1e6) for label, us in p50.items()}
    edged, direct = rates["edged"], rates["generate"]
    return [
        Row("gguf_tokens_per_s", "tokens_per_s", "tok/s", edged, "llama generate", direct),
        Row(
            "gguf_tokens_per_s_completion",
            "tokens_per_s",
            "tok/s",
            edged,
            "llama create_completion",
            rates["completion"],
        ),
    ]


def gguf_ttft(ctx: Context) -> list[Row]:
    """Median time to first token through edged (send to first piece) against in-process
    (tokenize to first detokenized token), a TTFT_PROMPT_TOKENS prompt; delta = edged's cost."""
    with ctx.llm_sides() as (client, model):
        medians = medians_s(llm.first_tokens(client, LLM, model, TTFT_PROMPT_TOKENS), ctx.settings)
    edged, direct = medians["edged"] * 1e3, medians["direct"] * 1e3
    return [Row("gguf_ttft", "p50_ttft", "ms", edged, "llama generate in-process", direct)]


def gguf_parallel_4(ctx: Context) -> list[Row]:
    """Aggregate tokens/s of PARALLEL streams at once from one model declared with ``parallel``
    against one stream alone on the same model, rounds of each taking turns; and the streams'
    median time to first text against the lone stream's (the streams' prompts are read in one
    batch). The ~210 MiB file: batching pays by reading weights once per step for every stream,
    which a model held in the CPU's caches (LARGE) does not need."""
    path = ctx.built(llm.XL.filename, llm.XL.build)
    options = dataclasses.replace(GENERATION, parallel=PARALLEL, n_threads=PARALLEL_THREADS)
    declared = llm.declaration(path, options, True)
    with DaemonProcess(ctx.workdir / "parallel", {"models": {LLM: declared}}) as daemon:
        found = llm_serving.parallel_rates(daemon.endpoint, LLM, PARALLEL, MAX_TOKENS, ctx.settings)
    name = f"gguf_parallel_{PARALLEL}"
    return [
        Row(name, "tokens_per_s", "tok/s", found["many"], "1 stream", found["single"]),
        Row(
            f"{name}_ttft",
            "p50_ttft",
            "ms",
            found["ttft_many_ms"],
            "1 stream",
            found["ttft_single_ms"],
        ),
    ]


def gguf_vs_llama_server(ctx: Context) -> list[Row]:
    """edged (its protocol, and its OpenAI endpoint) against llama-cpp-python's own OpenAI server
    on the same file and settings, greedy, streamed: tokens/s (ratio >= 1 means edged is faster)
    and time to first text (ratio <= 1 means edged is sooner)."""
    path = ctx.built(LARGE.filename, LARGE.build)
    port = llm_serving.free_port()
    config = {
        "models": {LLM: llm.declaration(path, GENERATION, preload=True)},
        "http": {"listen": f"127.0.0.1:{port}"},
    }
    with (
        DaemonProcess(ctx.workdir / "llm-http", config) as daemon,
        Client(daemon.endpoint, timeout=llm.STREAM_TIMEOUT_S) as client,
        llm_serving.llama_server(path, GENERATION) as server_port,
    ):
        llm_serving.wait_http(port)
        sides = {
            "edged": lambda text: llm_serving.stream_edged(client, LLM, text, MAX_TOKENS),
            "http": lambda text: llm_serving.stream_http(port, LLM, text, MAX_TOKENS),
            "server": lambda text: llm_serving.stream_http(server_port, LLM, text, MAX_TOKENS),
        }
        found = llm_serving.side_by_side(sides, MAX_TOKENS, ctx.settings)
    server = found["server"]
    rows = []
    for label, prefix in (("edged", "gguf_vs_llama_server"), ("http", "gguf_http_vs_llama_server")):
        side = found[label]
        rows += [
            Row(
                prefix,
                "tokens_per_s",
                "tok/s",
                MAX_TOKENS / side.total_s,
                "llama-cpp-python server",
                MAX_TOKENS / server.total_s,
            ),
            Row(
                f"{prefix}_ttft",
                "p50_ttft",
                "ms",
                side.ttft_s * 1e3,
                "llama-cpp-python server",
                server.ttft_s * 1e3,
            ),
        ]
    return rows


def http_rss(ctx: Context) -> list[Row]:
    """A fresh idle daemon serving the demo model with the OpenAI endpoint on against the same
    without it (median of three starts each): the difference is what the HTTP extra costs."""
    config = ctx.daemon_config(TINY)
    rss: dict[bool, list[float]] = {True: [], False: []}
    for attempt in range(3):
        for enabled in (False, True):
            extra = {"http": {"listen": f"127.0.0.1:{llm_serving.free_port()}"}} if enabled else {}
            workdir = ctx.workdir / f"http-rss-{enabled}-{attempt}"
            with DaemonProcess(workdir, {**config, **extra}) as daemon:
                time.sleep(ctx.settings.idle_s)
                rss[enabled].append(psutil.Process(daemon.pid).memory_info().rss / MIB)
    on, off = statistics.median(rss[True]), statistics.median(rss[False])
    return [Row("http_rss", "rss", "MiB", on, "http off", off)]


def embed_onnx(ctx: Context) -> list[Row]:
    """A sentence through an ONNX text encoder in the daemon (``embed``: tokenized, run, mean
    pooled, normalised) against the same tokenizer, session and pooling in this process: an
    encoder of MiniLM-L6's size (384 wide, 6 layers), and the tiny one, where the round trip's
    fixed cost is all there is to see."""
    from edged.tinybert import build_tiny_bert

    sizes: dict[str, tuple[str, Callable[[Path], Path]]] = {
        "embed_onnx": (
            "minilm_size.onnx",
            functools.partial(build_tiny_bert, hidden=384, layers=6),
        ),
        "embed_onnx_tiny": ("tiny_bert.onnx", build_tiny_bert),
    }
    rows = []
    for name, (filename, build) in sizes.items():
        path = ctx.built(filename, build)
        config = {"models": {"bert": {"path": str(path), "embed": {"normalize": True}}}}
        with (
            DaemonProcess(ctx.workdir / name, config) as daemon,
            Client(daemon.endpoint) as client,
        ):
            calls = {
                "edged": lambda: client.embed("bert", EMBED_TEXT),
                "direct": text_encoder_in_process(path),
            }
            p50 = p50s_us(calls, ctx.settings)
        rows.append(
            Row(name, "p50_rtt", "us", p50["edged"], "tokenizer + ort in-process", p50["direct"])
        )
    return rows


def text_encoder_in_process(path: Path) -> Callable[[], object]:
    """What an app would write: the model's tokenizer, an onnxruntime session, mean pooling and
    L2 normalisation with numpy; the session's threads as the daemon's default (one)."""
    import numpy as np
    import onnxruntime as ort
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path.with_suffix(".tokenizer.json")))
    options = ort.SessionOptions()
    options.intra_op_num_threads = OnnxOptions().intra_op_threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def embed() -> object:
        encoding = tokenizer.encode(EMBED_TEXT)
        mask = np.array([encoding.attention_mask], np.int64)
        feeds = {
            "input_ids": np.array([encoding.ids], np.int64),
            "attention_mask": mask,
            "token_type_ids": np.array([encoding.type_ids], np.int64),
        }
        states = session.run(None, feeds)[0]
        pooled = (states * mask[..., None]).sum(axis=1) / mask.sum(axis=1, keepdims=True)
        return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)

    return embed


def search_100k(ctx: Context) -> list[Row]:
    """100 000 clustered 384-d vectors in a collection: a k=10 search through the daemon
    against the same saved index searched in this process (target ratio <= 2; and searched
    after an idle gap as long as a round trip, as the daemon's searches are), recall@10
    against exact search (target >= 0.95), and the daemon's RSS with the collection against
    an idle daemon's."""
    found = vectors.search_rows(ctx.workdir / "search", ctx.settings)
    mib = 1024 * 1024
    return [
        Row("search_100k", "p50_rtt", "us", found["edged"], "usearch in-process", found["index"]),
        Row(
            "search_100k_idle",
            "p50_rtt",
            "us",
            found["edged"],
            "usearch in-process after an idle gap",
            found["index_idle"],
        ),
        Row("search_100k_recall", "recall@10", "", found["recall"], "exact search", 1.0),
        Row(
            "collection_rss_100k",
            "rss",
            "MiB",
            found["rss"] / mib,
            "idle daemon",
            found["bare_rss"] / mib,
        ),
    ]


def upsert_rate(ctx: Context) -> list[Row]:
    """Acknowledged upserts/s (each reply after the commit's fsync), one item and 64 items
    per request, against SQLite committing the same rows in this process."""
    rows = []
    for batch in (1, 64):
        rates = vectors.upsert_rates(ctx.workdir, ctx.settings, batch)
        name = "upsert_rate" if batch == 1 else f"upsert_rate_batch{batch}"
        rows.append(
            Row(name, "upserts_per_s", "items/s", rates["edged"], "sqlite commit", rates["sqlite"])
        )
    return rows


def budget_accuracy(ctx: Context) -> list[Row]:
    """What the budget charges each model against the RSS it adds once serving its worst case;
    |ratio - 1| is the accounting error."""
    rows = []
    for subject in lifecycle.SUBJECTS:
        path = ctx.built(subject.filename, subject.build)
        primer = ctx.built(subject.primer.filename, subject.primer.build)
        workdir = ctx.workdir / f"budget-{subject.name}"
        charged, used = lifecycle.charged_and_used(workdir, subject, path, primer)
        name = f"budget_accuracy_{subject.name}"
        rows.append(Row(name, "charged", "MiB", charged / MIB, "measured rss in use", used / MIB))
    return rows


def load_time(ctx: Context) -> list[Row]:
    """Each model's cold start through edged against its backend's load in-process: the first
    request's time minus a warm one's on both sides (see ``lifecycle.cold_load_ms``)."""
    paths = {s: ctx.built(s.filename, s.build) for s in lifecycle.SUBJECTS}
    cold = lifecycle.cold_load_ms(ctx.workdir / "load", paths, ctx.settings.cold_loads)
    return [
        Row(f"load_time_{name}", "p50_cold_load", "ms", edged, "backend load in-process", direct)
        for name, (edged, direct) in cold.items()
    ]


def swap_p99(ctx: Context) -> list[Row]:
    """p99 round trip while the model swaps back and forth (overlap) against the same clients'
    steady p99, slices of each taking turns; target ratio <= 3."""
    steady, swapping = ctx.swaps.steady, ctx.swaps.swapping
    p99, baseline = swapping.p99_us(), steady.p99_us()
    return [Row("swap_p99", "p99_rtt", "us", p99, "steady p99, same clients", baseline)]


def swap_failed(ctx: Context) -> list[Row]:
    """Requests failed while swapping (an error, a timeout, outputs not of the version the
    reply names) against all requests sent meanwhile: the ratio is the failure fraction. The
    steady window's failures are printed, with the number of swaps."""
    swapping = ctx.swaps.swapping
    failed, sent = float(swapping.failed), float(len(swapping.spans))
    return [Row("swap_failed", "failed", "requests", failed, "requests during swaps", sent)]


def overload_busy(ctx: Context, workload: Workload) -> list[Row]:
    """p99 time to a BUSY reply while a flood keeps the model's queue full, against the echo
    server's p99 for the same frames, slices of each taking turns; target: under 1 ms."""
    path = ctx.model_path(workload)
    config = {"models": {workload.model: overload.declaration(str(path))}}
    busy: list[float] = []
    echoed: list[float] = []
    admitted = 0
    with (
        DaemonProcess(ctx.workdir / f"overload-{workload.name}", config) as daemon,
        ServerProcess("bench.overload", daemon.endpoint, workload.name),
        ExitStack() as stack,
    ):
        echo = open_calls(stack, {"echo": ctx.echo}, workload)["echo"]
        for _ in range(ctx.settings.rounds):
            spans = overload.busy_spans(daemon.endpoint, workload, OVERLOAD_SLICE)
            busy += spans.spans
            admitted += spans.admitted
            echoed += repeat_for(echo, 0.0, OVERLOAD_SLICE)
    p50, echo_p50 = (statistics.median(spans) * 1e6 for spans in (busy, echoed))
    print(
        f"overload {workload.name}: {len(busy)} BUSY, {admitted} admitted; "
        f"p50 {p50:.0f} us (echo {echo_p50:.0f} us)",
        file=sys.stderr,
    )
    p99, baseline = p99_us(busy), p99_us(echoed)
    name = f"overload_busy_{workload.name}"
    return [Row(name, "p99_busy_reply", "us", p99, "echo p99, same frames", baseline)]


def rtt_frame(ctx: Context) -> list[Row]:
    """A 1920x1080 frame through the detector's pipeline in the daemon, against the same fused
    session in this process; and against the usual way (numpy preprocessing in the client,
    float32 over the socket, numpy NMS): there, ratio > 1 means edged is faster."""
    path, endpoint = ctx.built("detector.onnx", frames.build_detector), ctx.frames_endpoint
    with ExitStack() as stack:
        calls = {
            "shm": stack.enter_context(frames.by_region(endpoint, "camera")),
            "socket": stack.enter_context(frames.by_socket(endpoint, "camera")),
            "fused": stack.enter_context(frames.in_process(path)),
            "client_prep": stack.enter_context(frames.client_prep(endpoint, "detector")),
        }
        p50 = p50s_us(calls, ctx.settings)
    shm, fused = p50["shm"], p50["fused"]
    return [
        Row("rtt_frame_shm", "p50_rtt", "us", shm, "fused session in-process", fused),
        Row("rtt_frame_socket", "p50_rtt", "us", p50["socket"], "fused session in-process", fused),
        Row("rtt_frame_vs_client_prep", "p50_rtt", "us", p50["client_prep"], "edged by shm", shm),
    ]


def rtt_image_shm(ctx: Context) -> list[Row]:
    """The image model's input from a shared-memory region against the same in the request's
    frames (rtt_image's way): ratio < 1 means shared memory wins."""
    _, endpoint = ctx.edged
    p50 = ctx.p50s(IMAGE, {"shm": (region_caller, endpoint), "frames": ctx.edged})
    return [Row("rtt_image_shm", "p50_rtt", "us", p50["shm"], "frames", p50["frames"])]


def drift_detect(ctx: Context) -> list[Row]:
    """Requests until a 0.5-sigma shift of one feature is flagged (median of 5 streams; target
    <= 2000) and drift alarms in 100 000 stationary requests (target 0), through the daemon
    with every request profiled."""
    model = ctx.model_path(TINY)
    found = drift.detection(ctx.workdir / "drift", model)
    stationary = drift.false_alarms(ctx.workdir / "drift-stationary", model, 100_000)
    return [
        Row("drift_detect", "requests", "", found, "target", 2000),
        Row(
            "drift_false_alarms",
            "alarms",
            "",
            stationary["alarms"],
            "requests profiled",
            stationary["profiled"],
        ),
    ]


def drift_overhead(ctx: Context) -> list[Row]:
    """rtt_tiny and rtt_image with drift monitoring on over off (target <= 1.03): one daemon
    serving each model twice, bare and watched, so that the two differ in nothing else; with
    the drift defaults (at most 50 requests a second profiled), and every request profiled."""
    rows = []
    for suffix, options in (("", {}), ("_all", {"max_per_s": 0})):
        models: dict[str, object] = {}
        for workload in WORKLOADS:
            models[workload.model] = ctx.declaration(workload)
            models[f"{workload.model}_drift"] = {**ctx.declaration(workload), "drift": options}
        workdir = ctx.workdir / f"drift{suffix}"
        # a few per cent is all there is to see: five times the usual window to see it through
        # this machine's noise
        settings = dataclasses.replace(ctx.settings, window_s=5 * ctx.settings.window_s)
        with DaemonProcess(workdir, {"models": models}) as daemon, ExitStack() as stack:
            watched = (watched_caller, daemon.endpoint)
            for workload in WORKLOADS:
                targets = {"off": (edged_caller, daemon.endpoint), "on": watched}
                p50 = p50s_us(open_calls(stack, targets, workload), settings)
                name = f"drift_overhead_{workload.name}{suffix}"
                rows.append(Row(name, "p50_rtt", "us", p50["on"], "drift off", p50["off"]))
    return rows


def watched_caller(endpoint: str, workload: Workload) -> AbstractContextManager[Call]:
    """``edged_caller`` on the workload's model watched for drift (``drift_overhead``)."""
    return edged_caller(endpoint, dataclasses.replace(workload, model=f"{workload.model}_drift"))


BENCHMARKS: dict[str, Callable[[Context], list[Row]]] = {
    "rtt_tiny": functools.partial(rtt, workload=TINY),
    "rtt_image": functools.partial(rtt, workload=IMAGE),
    "rtt_frame": rtt_frame,
    "rtt_image_shm": rtt_image_shm,
    f"throughput_{CLIENTS}": throughput,
    "http_json": http_json,
    "peer_mosec": peer_mosec,
    "idle_rss": idle_rss,
    "gguf_tokens_per_s": gguf_tokens_per_s,
    "gguf_ttft": gguf_ttft,
    f"gguf_parallel_{PARALLEL}": gguf_parallel_4,
    "gguf_vs_llama_server": gguf_vs_llama_server,
    "http_rss": http_rss,
    "embed_onnx": embed_onnx,
    "search_100k": search_100k,
    "upsert_rate": upsert_rate,
    "drift_detect": drift_detect,
    "drift_overhead": drift_overhead,
    "budget_accuracy": budget_accuracy,
    "load_time": load_time,
    "swap_p99": swap_p99,
    "swap_failed": swap_failed,
    "overload_busy_image": functools.partial(overload_busy, workload=IMAGE),
    "overload_busy_sensor": functools.partial(overload_busy, workload=overload.SENSOR),
}
