"""Typed configuration: one frozen dataclass tree, loaded from TOML and validated in one step.

Every default lives here and only here (docs/CONFIG.md lists them), but for the settings of a
model's pipeline steps, which live with the steps (``edged.steps``). An unknown key, a wrong
type or a value out of range is a ``ConfigError`` naming the file and the dotted key.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import os
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edged.errors import ConfigError
from edged.steps.frame import FrameSteps
from edged.steps.pipeline import Pipeline, Postprocess

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 (JetPack 6)
    import tomli as tomllib

SYSTEM_CONFIG = Path("/etc/edged/edged.toml")
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
DEFAULTS_SOURCE = "<defaults>"
MIB = 1024 * 1024
LOOPBACK = ("127.0.0.1", "::1", "localhost")
#: ``[http] listen`` names a Unix socket with this prefix
UNIX_PREFIX = "unix:"
#: sockaddr_un's sun_path holds 108 bytes, the terminating NUL included
MAX_UNIX_PATH = 107
#: the short names ``[models.X.onnx] providers`` takes, for onnxruntime's execution providers
ONNX_PROVIDER_ALIASES = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
#: the execution providers onnxruntime builds have (``onnxruntime.get_all_providers()``): a name
#: outside these and the aliases is a typo, which the load would skip as "not available here"
ONNX_PROVIDERS = (
    "TensorrtExecutionProvider",
    "NvTensorRTRTXExecutionProvider",
    "CUDAExecutionProvider",
    "MIGraphXExecutionProvider",
    "ROCMExecutionProvider",
    "OpenVINOExecutionProvider",
    "DnnlExecutionProvider",
    "VitisAIExecutionProvider",
    "QNNExecutionProvider",
    "NnapiExecutionProvider",
    "VSINPUExecutionProvider",
    "JsExecutionProvider",
    "CoreMLExecutionProvider",
    "ArmNNExecutionProvider",
    "ACLExecutionProvider",
    "DmlExecutionProvider",
    "RknpuExecutionProvider",
    "WebNNExecutionProvider",
    "WebGpuExecutionProvider",
    "XnnpackExecutionProvider",
    "CANNExecutionProvider",
    "AzureExecutionProvider",
    "CPUExecutionProvider",
)


def _choice(default: str, *choices: str) -> Any:
    return field(default=default, metadata={"choices": choices})


def _at_least(default: float, minimum: float) -> Any:
    return field(default=default, metadata={"min": minimum})


@dataclass(frozen=True)
class OnnxOptions:
    """onnxruntime session settings for one model."""

    intra_op_threads: int = _at_least(1, 0)  # 0 lets onnxruntime pick (all cores)
    inter_op_threads: int = _at_least(1, 0)
    graph_optimization: str = _choice("all", "disable", "basic", "extended", "all")
    #: execution providers in order of preference; ones this onnxruntime build lacks are
    #: skipped, so the default serves on TensorRT or CUDA where onnxruntime-gpu has them (a
    #: Jetson) and on the CPU elsewhere
    providers: tuple[str, ...] = ("tensorrt", "cuda", "cpu")
    #: TensorRT builds fp16 engines (Jetson GPUs run fp16 at twice the fp32 rate); engines are
    #: cached under <state>/cache/tensorrt, so only the first load of a model builds one
    tensorrt_fp16: bool = True


@dataclass(frozen=True)
class GgufOptions:
    """llama.cpp context settings for one GGUF model."""

    #: context length in tokens: prompt plus generated tokens must fit; sizes the KV cache
    n_ctx: int = _at_least(2048, 16)
    #: prompt tokens evaluated per llama.cpp call
    n_batch: int = _at_least(512, 1)
    #: compute threads; 0 lets llama-cpp-python pick (half the cores)
    n_threads: int = _at_least(0, 0)
    #: threads that evaluate prompts (a batch of tokens at once); -1 takes ``n_threads``, so that
    #: ``n_threads`` bounds the whole model; 0 lets llama-cpp-python pick (all the cores)
    n_threads_batch: int = _at_least(-1, -1)
    #: layers offloaded to the GPU (CUDA builds of llama.cpp, e.g. on a Jetson); -1 means all
    n_gpu_layers: int = _at_least(0, -1)
    #: an embedding model: serves ``embed`` (mean-pooled) instead of ``generate``
    embedding: bool = False
    #: map the file rather than reading it: pages are shared with the page cache
    use_mmap: bool = True
    #: after the first token, streamed messages are at least this far apart: tokens produced
    #: in between share a message (each message costs the model's thread a little); 0 sends
    #: every token as soon as it is ready
    stream_interval_ms: float = _at_least(5.0, 0.0)
    #: generations served at once (llama.cpp decodes them in one batch); each has its own
    #: ``n_ctx`` of KV cache, all charged to the budget
    parallel: int = _at_least(1, 1)
    #: flash attention: "off" as in llama-cpp-python, "on", or "auto" (llama.cpp decides per
    #: device; it changes results in the last bits, so greedy text may differ from "off")
    flash_attn: str = _choice("off", "off", "on", "auto")
    #: a Jinja chat template for ``chat``, replacing the file's ``tokenizer.chat_template``
    chat_template: str = ""


@dataclass(frozen=True)
class EmbedOptions:
    """How a model's output becomes one vector per text for ``embed``; an ONNX model with this
    table is a text encoder, with a tokenizer of its own."""

    #: (ONNX) a Hugging Face ``tokenizer.json``; "" looks beside the model for
    #: ``<stem>.tokenizer.json``, then ``tokenizer.json``
    tokenizer: str = ""
    #: (ONNX) the most tokens a text may take; 0: the model's sequence axis when fixed, else
    #: the tokenizer's own truncation limit, else 512
    max_length: int = _at_least(0, 0)
    #: (ONNX) cut a longer text to ``max_length`` tokens rather than refuse it
    truncate: bool = False
    #: "mean" of the text's tokens, "cls" its first token, "last" its last token, or "none"
    #: (ONNX): the output is already one vector per text
    pooling: str = _choice("mean", "mean", "cls", "last", "none")
    #: scale each vector to unit length, as cosine similarity expects
    normalize: bool = False
    #: (ONNX) the output to pool: [texts, tokens, dim] (or [texts, dim] with pooling "none");
    #: "" is the model's first output
    output: str = ""


@dataclass(frozen=True)
class DriftOptions:
    """Watching an ONNX model's inputs and outputs for drift from a reference, and for broken
    data (docs/OPERATIONS.md#drift)."""

    #: the fraction of requests profiled
    sample: float = field(default=1.0, metadata={"min": 0.0})
    #: profiled requests a second at most, beyond which requests are sampled less; 0: no cap
    max_per_s: float = _at_least(50.0, 0.0)
    #: a version's reference when its bundle shipped none: "traffic" (its first
    #: ``reference_size`` observations) or "golden" (its golden vectors)
    reference: str = _choice("traffic", "traffic", "golden")
    #: observations a reference is made of (from traffic)
    reference_size: int = _at_least(1000, 20)
    #: observations in the sliding window compared with the reference
    window: int = _at_least(500, 20)
    #: bins per feature, cut at the reference's quantiles
    bins: int = _at_least(20, 2)
    #: a feature whose population stability index exceeds this has drifted
    psi_threshold: float = _at_least(0.25, 0.0)
    #: a feature whose KS statistic exceeds this has drifted; 0: the critical value at which a
    #: window of the reference's own distribution exceeds it once in a million checks
    ks_threshold: float = _at_least(0.0, 0.0)
    #: the data contract: values a tensor must stay within, tensor name -> [low, high]
    ranges: dict[str, tuple[float, ...]] = field(default_factory=dict)
    #: a feature this many times in a row the same value is stuck (a frozen sensor)
    stuck_after: int = _at_least(50, 2)
    #: seconds between two journal warnings of the same alarm
    warn_interval_s: float = _at_least(300.0, 0.0)
    #: MiB of profiled requests' inputs and outputs kept on the device for retraining, under
    #: <state>/capture/<model>/, the oldest removed first; 0: none kept
    capture_mb: int = _at_least(0, 0)
    #: which profiled requests are kept: "drift" (while an alarm is up) or "always"; ``edgectl
    #: capture MODEL --for SECONDS`` keeps all of them for a while
    capture: str = _choice("drift", "drift", "always")


@dataclass(frozen=True)
class ModelConfig:
    #: the model file; "" serves the newest version in the store, <state>/models/<name>/
    path: str = ""
    #: with no path: the store version to serve at start; 0 means the newest
    version: int = _at_least(0, 0)
    #: "auto" picks by the store manifest's format, else by the file name (.gguf or not)
    backend: str = _choice("auto", "auto", "onnx", "gguf")
    #: requests waiting for a run beyond this many get BUSY at once
    queue_depth: int = _at_least(64, 1)
    #: rows per run when the model has a dynamic batch dimension; 1 disables batching
    max_batch: int = _at_least(1, 1)
    #: how long a partial batch may wait for more rows
    max_delay_us: int = _at_least(0, 0)
    #: run on the event-loop thread while recent runs took less than this; 0 always uses a thread
    inline_max_us: int = _at_least(100, 0)
    #: load at start rather than on the first request
    preload: bool = False
    #: loaded at start and never unloaded for idleness
    pinned: bool = False
    #: unload after this long without requests; 0 keeps the model loaded
    keep_alive_s: float = _at_least(300.0, 0.0)
    onnx: OnnxOptions = field(default_factory=OnnxOptions)
    gguf: GgufOptions = field(default_factory=GgufOptions)
    #: an ONNX model's input made from a raw camera frame inside the model's session
    preprocess: FrameSteps | None = None
    #: a classifier's scores or a detector's boxes, made from its outputs inside the session
    postprocess: Postprocess | None = None
    #: texts in, one vector each out (``embed``): an ONNX text encoder's tokenizer and pooling,
    #: or a GGUF embedding model's pooling
    embed: EmbedOptions | None = None
    #: (ONNX) drift and data-contract monitoring of its inputs and outputs
    drift: DriftOptions | None = None

    @property
    def pipeline(self) -> Pipeline:
        return Pipeline(self.preprocess, self.postprocess)

    def backend_for(self, path: str) -> str:
        """The backend that serves the file at ``path``: the configured one, else by suffix."""
        if self.backend != "auto":
            return self.backend
        return "gguf" if path.lower().endswith(".gguf") else "onnx"


@dataclass(frozen=True)
class ChainStep:
    #: the declared model this step runs
    model: str
    #: after the first step: this model's one input is the crops of the request's ``frame`` at
    #: the previous step's ``boxes`` (a batch of one row per box), made as these settings say;
    #: ``crops.input`` names that input
    crops: FrameSteps | None = None
    #: after the first step: this model's inputs from the previous step's outputs, as
    #: input name -> output name
    inputs: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ChainConfig:
    """Models run one after the other for one request, where their graphs cannot be fused (a
    detector whose crops feed a classifier): the daemon runs the steps and replies once."""

    steps: tuple[ChainStep, ...] = ()


@dataclass(frozen=True)
class CollectionConfig:
    """A vector collection: persisted under the state directory, searched by ``search``."""

    #: every vector's length (required)
    dim: int = field(metadata={"min": 1})
    #: "cosine" (distance 1 - cos), "l2" (squared distance) or "ip" (1 - dot product)
    metric: str = _choice("cosine", "cosine", "l2", "ip")
    #: the declared model that embeds texts given instead of vectors ("" takes vectors only)
    model: str = ""


@dataclass(frozen=True)
class ServerConfig:
    #: extra inference endpoints besides ipc://<runtime>/infer.sock, e.g. "tcp://127.0.0.1:5555"
    tcp: tuple[str, ...] = ()
    #: largest accepted request (whole message; the socket also drops any larger frame)
    max_message_bytes: int = _at_least(64 * MIB, 1024)
    #: ZeroMQ high-water marks (messages) on the inference socket
    send_hwm: int = _at_least(1000, 1)
    recv_hwm: int = _at_least(1000, 1)
    #: shared-memory regions one connection of regions.sock may hold mapped at once
    max_regions: int = _at_least(64, 1)
    #: all mapped shared-memory regions together, every connection's
    max_region_mb: int = _at_least(4096, 1)


@dataclass(frozen=True)
class HttpConfig:
    """The OpenAI-compatible HTTP endpoint (the ``http`` extra); off unless ``listen`` is set."""

    #: "" (off), "127.0.0.1:8080" (host:port; loopback unless ``public``), or "unix:/path"
    listen: str = ""
    #: allow a non-loopback host in ``listen``: the endpoint has no authentication
    public: bool = False
    #: largest accepted request body
    max_body_mb: int = _at_least(8, 1)


@dataclass(frozen=True)
class ControlConfig:
    """Remote control: the control socket on TCP, where CurveZMQ is mandatory."""

    #: TCP endpoints for the control socket besides its IPC one, e.g. "tcp://0.0.0.0:5556"
    tcp: tuple[str, ...] = ()
    #: the daemon's key pair, a ``.key_secret`` file from ``edgectl keys curve``
    server_key: str = ""
    #: a directory of client public key files (``.key``) that may connect
    authorized_keys: str = ""
    #: allow TCP without CurveZMQ: anyone who reaches the port controls the daemon
    insecure: bool = False


@dataclass(frozen=True)
class OtaConfig:
    """Signed model bundles: which keys this device trusts, and how large a bundle may be."""

    #: a directory of Ed25519 public keys (``NAME.pub`` from ``edged keys gen``); "" means
    #: bundles cannot be installed
    trusted_keys: str = ""
    #: the largest bundle accepted, its files together
    max_bundle_mb: int = _at_least(4096, 1)
    #: after an install, stored versions beyond the newest this many are removed (never one
    #: that is loaded or is the rollback target)
    keep_versions: int = _at_least(3, 2)
    #: a directory watched for ``*.bundle`` files (an OTA agent writes, then renames one in);
    #: "" means none
    inbox: str = ""
    #: after an install's swap, how long live traffic is watched before the version is
    #: committed; a version that fails the watch is rolled back. 0 commits at once
    health_window_s: float = _at_least(60.0, 0.0)
    #: the gate fails when more than this share of the new version's requests fail
    health_max_error_rate: float = _at_least(0.01, 0.0)
    #: the gate fails when the new version's median or p99 latency exceeds the old one's by
    #: this factor (and by more than 1 ms, so jitter on sub-millisecond models is no regression)
    health_max_latency_ratio: float = _at_least(3.0, 1.0)
    #: fewer requests than this in the window cannot judge: the version is committed unjudged
    health_min_requests: int = _at_least(20, 1)
    #: the gate also fails a version whose outputs drifted from the reference of the version it
    #: replaced (a model with a ``drift`` table; its thresholds), docs/OTA.md#health-gate
    health_output_drift: bool = False


@dataclass(frozen=True)
class MetricsConfig:
    #: also serve the Prometheus metrics over HTTP at this loopback "HOST:PORT" ("" = off)
    http: str = ""


@dataclass(frozen=True)
class MemoryConfig:
    #: memory for all loaded models together; 0 means only the reserve limits loads
    budget_mb: int = _at_least(0, 0)
    #: memory kept free for the rest of the system: a load that would eat into it evicts or fails
    reserve_mb: int = _at_least(256, 0)


@dataclass(frozen=True)
class DaemonConfig:
    #: sockets live here; "" means $RUNTIME_DIRECTORY, $XDG_RUNTIME_DIR/edged or /tmp/edged-$UID
    runtime_dir: str = ""
    #: models and state live here; "" means $STATE_DIRECTORY, $EDGED_HOME or ./var/edged
    state_dir: str = ""
    log_level: str = _choice("info", "debug", "info", "warning", "error")
    #: on SIGTERM, how long in-flight and queued requests may take to finish
    drain_timeout_s: float = _at_least(10.0, 0.0)
    #: after a swap, how long the old version may take to finish its requests (a running
    #: generation included) before they fail
    swap_grace_s: float = _at_least(30.0, 0.0)
    #: a model run (or, for a language model, the wait for its next token) going longer than
    #: this counts as stuck: the daemon stops pinging systemd's watchdog, which restarts it
    stuck_run_s: float = _at_least(120.0, 1.0)
    #: "uvloop" needs the uvloop package; it measured no faster here and costs ~5 MB of RSS
    event_loop: str = _choice("asyncio", "asyncio", "uvloop")


@dataclass(frozen=True)
class Config:
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    ota: OtaConfig = field(default_factory=OtaConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    #: collection name -> declaration
    collections: dict[str, CollectionConfig] = field(default_factory=dict)
    #: model name -> declaration; empty means "serve the built-in demo model"
    models: dict[str, ModelConfig] = field(default_factory=dict)
    #: chain name -> its steps; a client infers on a chain as on a model
    chains: dict[str, ChainConfig] = field(default_factory=dict)
    #: where this config came from (a path or "<defaults>"), for messages
    source: str = field(default=DEFAULTS_SOURCE, metadata={"internal": True})


def find_config_file(explicit: str | None) -> Path | None:
    """Lookup order: -c, $EDGED_CONFIG, ./edged.toml, /etc/edged/edged.toml, else none."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("EDGED_CONFIG")
    if env:
        return Path(env)
    for candidate in (Path("edged.toml"), SYSTEM_CONFIG):
        if candidate.is_file():
            return candidate
    return None


def load_config(path: Path | None) -> Config:
    if path is None:
        return Config()
    return parse_config(_read_toml(path), source=str(path), base_dir=path.parent)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            data: dict[str, Any] = tomllib.load(fh)
            return data
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def read_pipeline(path: Path) -> Pipeline:
    """A model version's own pipeline, shipped in its bundle: a TOML file of ``[preprocess]``
    and ``[postprocess]`` tables, as under ``[models.X]``."""
    pipeline: Pipeline = _build(Pipeline, _read_toml(path), str(path), "")
    return pipeline


def _embed_paths(embed: EmbedOptions | None, base_dir: Path) -> EmbedOptions | None:
    if embed is None or not embed.tokenizer:
        return embed
    return dataclasses.replace(embed, tokenizer=str(base_dir / embed.tokenizer))


def parse_config(data: dict[str, Any], source: str, base_dir: Path) -> Config:
    config: Config = _build(Config, data, source, "")
    for name, model in config.models.items():
        if not MODEL_NAME.fullmatch(name):
            raise ConfigError(
                f"{source}: model name {name!r} must be letters, digits, '.', '_' or '-'"
            )
        if model.path and model.version:
            raise ConfigError(
                f"{source}: 'models.{name}': a 'version' picks a stored version; a model with "
                f"a 'path' has none"
            )
        _check_providers(model.onnx.providers, source, f"models.{name}.onnx.providers")
        if model.pipeline and model.backend_for(model.path or ".onnx") == "gguf":
            raise ConfigError(
                f"{source}: 'models.{name}': preprocess and postprocess apply to ONNX models"
            )
        _check_embed(name, model, source)
        _check_drift(name, model, source)
    for name, chain in config.chains.items():
        _check_chain(name, chain, config.models, source)
    for name, collection in config.collections.items():
        if not MODEL_NAME.fullmatch(name):
            raise ConfigError(
                f"{source}: collection name {name!r} must be letters, digits, '.', '_' or '-'"
            )
        if collection.model and collection.model not in config.models:
            raise ConfigError(
                f"{source}: 'collections.{name}.model' {collection.model!r} is not a declared model"
            )
    models = {
        name: dataclasses.replace(
            model,
            path=str(base_dir / model.path) if model.path else "",
            embed=_embed_paths(model.embed, base_dir),
        )
        for name, model in config.models.items()
    }
    daemon = config.daemon  # relative paths in a file mean relative to that file, like models
    daemon = dataclasses.replace(
        daemon,
        runtime_dir=str(base_dir / daemon.runtime_dir) if daemon.runtime_dir else "",
        state_dir=str(base_dir / daemon.state_dir) if daemon.state_dir else "",
    )
    control = config.control
    control = dataclasses.replace(
        control,
        server_key=str(base_dir / control.server_key) if control.server_key else "",
        authorized_keys=str(base_dir / control.authorized_keys) if control.authorized_keys else "",
    )
    _check_remote_control(control, source)
    _check_metrics(config.metrics, source)
    http_binding(config.http, source)
    trusted, inbox = config.ota.trusted_keys, config.ota.inbox
    if inbox and not trusted:
        raise ConfigError(f"{source}: 'ota.inbox' needs 'ota.trusted_keys' to check bundles")
    ota = dataclasses.replace(
        config.ota,
        trusted_keys=str(base_dir / trusted) if trusted else "",
        inbox=str(base_dir / inbox) if inbox else "",
    )
    return dataclasses.replace(
        config, daemon=daemon, control=control, ota=ota, models=models, source=source
    )


def _check_chain(
    name: str, chain: ChainConfig, models: dict[str, ModelConfig], source: str
) -> None:
    """Two or more declared models; every step after the first says where its input comes
    from, the first takes the request's."""
    where = f"{source}: 'chains.{name}'"
    if not MODEL_NAME.fullmatch(name) or name in models:
        raise ConfigError(f"{where}: a chain's name is a valid name that no model has")
    if len(chain.steps) < 2:
        raise ConfigError(f"{where}: a chain has at least two steps")
    for index, step in enumerate(chain.steps):
        at = f"{where}.steps[{index}]"
        if step.model not in models:
            raise ConfigError(f"{at}: no model {step.model!r} is declared")
        feeds = (step.crops is not None) + bool(step.inputs)
        if index == 0 and feeds:
            raise ConfigError(f"{at}: the first step takes the request's inputs")
        if index > 0 and feeds != 1:
            raise ConfigError(f"{at}: a later step takes exactly one of 'crops' or 'inputs'")
        crops = step.crops
        if crops is not None and (crops.crop or crops.letterbox or not crops.input):
            raise ConfigError(
                f"{at}.crops: crops take no crop or letterbox, and 'input' names the model "
                f"input they feed"
            )


def _check_remote_control(control: ControlConfig, source: str) -> None:
    """TCP control without CurveZMQ is refused unless explicitly, knowingly asked for."""
    for endpoint in control.tcp:
        if not endpoint.startswith("tcp://"):
            raise ConfigError(f"{source}: 'control.tcp' entries must be tcp:// endpoints")
    curve = bool(control.server_key and control.authorized_keys)
    if control.tcp and not curve and not control.insecure:
        raise ConfigError(
            f"{source}: 'control.tcp' needs CurveZMQ: set 'control.server_key' and "
            f"'control.authorized_keys' (edgectl keys curve), or 'control.insecure = true' to let "
            f"anyone who reaches the port control the daemon"
        )
    if bool(control.server_key) != bool(control.authorized_keys):
        raise ConfigError(
            f"{source}: 'control.server_key' and 'control.authorized_keys' go together"
        )


def _check_providers(providers: tuple[str, ...], source: str, where: str) -> None:
    """Each one a short name (any case) or one of onnxruntime's provider names."""
    for i, name in enumerate(providers):
        if name.lower() in ONNX_PROVIDER_ALIASES or name in ONNX_PROVIDERS:
            continue
        known = {option.lower(): option for option in [*ONNX_PROVIDER_ALIASES, *ONNX_PROVIDERS]}
        close = difflib.get_close_matches(name.lower(), known, n=1)
        hint = f"did you mean {known[close[0]]!r}? " if close else ""
        raise ConfigError(
            f"{source}: '{where}[{i}]': unknown execution provider {name!r}; {hint}"
            f"known: {', '.join(ONNX_PROVIDER_ALIASES)} or onnxruntime's names such as "
            f"CUDAExecutionProvider"
        )


def _check_embed(name: str, model: ModelConfig, source: str) -> None:
    embed = model.embed
    if embed is None or model.backend_for(model.path or ".onnx") != "gguf":
        return
    onnx_only = [
        key
        for key in ("tokenizer", "max_length", "truncate", "output")
        if getattr(embed, key) != getattr(EmbedOptions, key)
    ]
    if onnx_only or embed.pooling == "none" or not model.gguf.embedding:
        what = (
            f"'{onnx_only[0]}' applies to ONNX models"
            if onnx_only
            else (
                "pooling 'none' applies to ONNX models"
                if embed.pooling == "none"
                else "a GGUF model embeds with 'gguf.embedding = true'"
            )
        )
        raise ConfigError(f"{source}: 'models.{name}.embed': {what}")


def _check_drift(name: str, model: ModelConfig, source: str) -> None:
    drift = model.drift
    if drift is None:
        return
    where = f"{source}: 'models.{name}.drift"
    if model.backend_for(model.path or ".onnx") == "gguf":
        raise ConfigError(f"{where}': drift monitoring applies to ONNX models")
    if not 0 < drift.sample <= 1:
        raise ConfigError(f"{where}.sample' must be above 0 and at most 1, got {drift.sample}")
    for tensor, bounds in drift.ranges.items():
        if len(bounds) != 2 or bounds[0] > bounds[1]:
            raise ConfigError(
                f"{where}.ranges.{tensor}' must be [low, high] with low <= high, got {list(bounds)}"
            )


def _check_metrics(metrics: MetricsConfig, source: str) -> None:
    if not metrics.http:
        return
    host, _, port = metrics.http.rpartition(":")
    if host.strip("[]") not in LOOPBACK or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            f"{source}: 'metrics.http' must be a loopback HOST:PORT such as 127.0.0.1:9464 "
            f"(put a proxy in front to scrape it from elsewhere), got {metrics.http!r}"
        )


@dataclass(frozen=True)
class Binding:
    """A TCP ``host`` and ``port``, or a Unix socket ``path``."""

    host: str = ""
    port: int = 0
    path: str = ""

    @property
    def url(self) -> str:
        """How a log line names it."""
        if self.path:
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def http_binding(http: HttpConfig, source: str) -> Binding | None:
    """The binding ``[http] listen`` asks for (``None`` when it is off), or a ``ConfigError``
    naming what is wrong."""
    listen = http.listen
    if not listen:
        return None
    binding = _unix(listen, source) if listen.startswith(UNIX_PREFIX) else _tcp(listen, source)
    if binding.host and not http.public and not is_loopback(binding.host):
        raise ConfigError(
            f"{source}: 'http.listen' {listen!r} is not a loopback address, and the endpoint "
            f"has no authentication: set 'http.public = true' to serve it to the network "
            f"anyway (behind a firewall or an authenticating proxy)"
        )
    return binding


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def _tcp(listen: str, source: str) -> Binding:
    host, _, port = listen.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            f"{source}: 'http.listen' must be HOST:PORT (such as 127.0.0.1:8080 or [::1]:8080) "
            f"or unix:/absolute/path, got {listen!r}"
        )
    return Binding(host=host, port=int(port))


def _unix(listen: str, source: str) -> Binding:
    path = listen[len(UNIX_PREFIX) :]
    if not Path(path).is_absolute() or len(path.encode()) > MAX_UNIX_PATH:
        raise ConfigError(
            f"{source}: 'http.listen' {listen!r}: a Unix socket needs an absolute path of at "
            f"most {MAX_UNIX_PATH} bytes"
        )
    return Binding(path=path)


# A small hand-written mapper rather than pydantic or dacite: it keeps start-up import cost near
# zero on the device and lets every message carry the file name, the dotted key and a suggestion.
def _build(cls: type[Any], data: Any, source: str, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: '{where}' must be a table")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean '{_join(where, close[0])}'?)" if close else ""
            raise ConfigError(f"{source}: unknown key '{_join(where, key)}'{hint}")
    missing = [
        name
        for name, f in fields.items()
        if name not in data
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{source}: missing key '{_join(where, missing[0])}'")
    values = {
        key: _convert(hints[key], value, fields[key].metadata, source, _join(where, key))
        for key, value in data.items()
    }
    try:
        return cls(**values)
    except ValueError as exc:  # a dataclass that checks itself (the pipeline steps)
        raise ConfigError(f"{source}: '{where}': {exc}") from None


def _convert(hint: Any, value: Any, meta: Any, source: str, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):  # ``X | None``: a table that may be absent
        (hint,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(typing.cast(type, hint), value, source, where)
    if origin is dict:
        _, item = typing.get_args(hint)
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{where}' must be a table")
        return {k: _convert(item, v, {}, source, _join(where, k)) for k, v in value.items()}
    if origin is tuple:
        (item, _) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{source}: '{where}' must be an array")
        return tuple(_convert(item, v, {}, source, f"{where}[{i}]") for i, v in enumerate(value))
    return _scalar(hint, value, meta, source, where)


def _scalar(kind: type, value: Any, meta: Any, source: str, where: str) -> Any:
    accepted = (int, float) if kind is float else (kind,)
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, accepted):
        got = type(value).__name__
        raise ConfigError(f"{source}: '{where}' must be {kind.__name__}, got {got} {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{source}: '{where}' must be a finite number, got {value!r}")
    choices = meta.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{source}: '{where}' must be one of {', '.join(choices)}, got {value!r}")
    minimum = meta.get("min")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{source}: '{where}' must be >= {minimum}, got {value!r}")
    return kind(value)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key
