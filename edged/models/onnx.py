"""onnxruntime backend: session options, execution-provider fallback, signature.

onnxruntime prints its own log lines to stderr, beside the daemon's records and in another
format. Its sessions are kept quiet (every error they would print also reaches edged as an
exception, which edged logs) and its process-wide logger prints errors only.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from edged.config import ONNX_PROVIDER_ALIASES, EmbedOptions, OnnxOptions
from edged.models.backend import Arrays, Signature, TensorSpec
from edged.models.onnx_size import weight_bytes
from edged.models.text_encoder import TextEncoder
from edged.steps.pipeline import Pipeline

log = logging.getLogger(__name__)

SESSION_OVERHEAD_BYTES = 4 * 1024 * 1024
#: onnxruntime's severities: sessions print nothing below fatal, the process-wide logger errors
ORT_ERROR, ORT_FATAL = 3, 4

ort.set_default_logger_severity(ORT_ERROR)

#: x float[1] -> Identity -> y, the smallest session there is: onnx.helper.make_model of one
#: Identity node, graph "prime", opset 13, IR version 7, producer fields cleared (a test checks it)
PRIME_MODEL = (
    b'\x08\x07:;\n\x10\n\x01x\x12\x01y"\x08Identity\x12\x05primeZ\x0f\n\x01x\x12\n\n'
    b"\x08\x08\x01\x12\x04\n\x02\x08\x01b\x0f\n\x01y\x12\n\n\x08\x08\x01\x12\x04\n\x02\x08\x01B"
    b"\x04\n\x00\x10\r"
)

GRAPH_OPTIMIZATION = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}

# onnxruntime type strings -> numpy dtypes for the types the wire protocol carries
ORT_DTYPES = {
    "tensor(bool)": np.dtype("bool"),
    "tensor(int8)": np.dtype("int8"),
    "tensor(uint8)": np.dtype("uint8"),
    "tensor(int16)": np.dtype("int16"),
    "tensor(uint16)": np.dtype("uint16"),
    "tensor(int32)": np.dtype("int32"),
    "tensor(uint32)": np.dtype("uint32"),
    "tensor(int64)": np.dtype("int64"),
    "tensor(uint64)": np.dtype("uint64"),
    "tensor(float16)": np.dtype("float16"),
    "tensor(float)": np.dtype("float32"),
    "tensor(double)": np.dtype("float64"),
}


def choose_providers(preferred: tuple[str, ...], available: list[str]) -> list[str]:
    """Keep the preferred providers that this onnxruntime build has, CPU always last. (The
    load logs the ones in use: the default names GPU providers that a CPU build skips.)"""
    chosen = []
    for name in preferred:
        full = ONNX_PROVIDER_ALIASES.get(name.lower(), name)
        if full not in available:
            log.debug("execution provider %s is not available here; skipping it", full)
        elif full not in chosen:
            chosen.append(full)
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


def with_provider_options(
    chosen: list[str], options: OnnxOptions, cache_dir: Path | None
) -> list[str | tuple[str, dict[str, Any]]]:
    """TensorRT's settings: fp16 as configured, and engines (and timing data) cached on disk,
    since building an engine takes minutes on a Jetson and would otherwise repeat at every
    load."""
    settings: list[str | tuple[str, dict[str, Any]]] = []
    for name in chosen:
        if name != "TensorrtExecutionProvider":
            settings.append(name)
            continue
        trt: dict[str, Any] = {"trt_fp16_enable": options.tensorrt_fp16}
        if cache_dir is not None:
            engines = str(cache_dir / "tensorrt")
            trt.update(
                trt_engine_cache_enable=True,
                trt_engine_cache_path=engines,
                trt_timing_cache_enable=True,
                trt_timing_cache_path=engines,
            )
        settings.append((name, trt))
    return settings


def _spec(node: Any) -> TensorSpec:
    dtype = ORT_DTYPES.get(node.type)
    if dtype is None:
        raise ValueError(f"tensor {node.name!r} has type {node.type}, which edged cannot carry")
    shape = tuple(d if isinstance(d, int) and d >= 0 else None for d in node.shape)
    return TensorSpec(node.name, dtype, shape)


class OnnxBackend:
    def __init__(self, session: ort.InferenceSession) -> None:
        self._session = session
        #: a text encoder's tokenizer and pooling (``[models.X.embed]``), set by ``load``
        self.text: TextEncoder | None = None
        self._signature = Signature(
            inputs=tuple(_spec(n) for n in session.get_inputs()),
            outputs=tuple(_spec(n) for n in session.get_outputs()),
        )
        self._output_names = [spec.name for spec in self._signature.outputs]

    @classmethod
    def load(
        cls,
        path: Path,
        options: OnnxOptions,
        cache_dir: Path | None = None,
        pipeline: Pipeline | None = None,
        embed: EmbedOptions | None = None,
    ) -> OnnxBackend:
        """``cache_dir`` keeps what providers build for a model (TensorRT engines) across
        loads; a ``pipeline`` is fused with the model into the one session; ``embed`` makes
        it a text encoder, with its tokenizer."""
        so = ort.SessionOptions()
        so.intra_op_num_threads = options.intra_op_threads
        so.inter_op_num_threads = options.inter_op_threads
        so.graph_optimization_level = GRAPH_OPTIMIZATION[options.graph_optimization]
        so.log_severity_level = ORT_FATAL
        chosen = choose_providers(options.providers, ort.get_available_providers())
        if "TensorrtExecutionProvider" in chosen and cache_dir is not None:
            (cache_dir / "tensorrt").mkdir(parents=True, exist_ok=True)
        providers = with_provider_options(chosen, options, cache_dir)
        source: str | bytes = str(path)
        if pipeline:
            import onnx

            source = pipeline.apply(onnx.load(path)).SerializeToString()
        session = ort.InferenceSession(source, sess_options=so, providers=providers)
        log.info("loaded %s with providers %s", path, ", ".join(session.get_providers()))
        backend = cls(session)
        if embed is not None:
            backend.text = TextEncoder.load(str(path), backend.signature, embed)
        return backend

    @staticmethod
    def prime() -> None:
        """Before the first load: run onnxruntime's one-time start-up (its kernel registry,
        about 8 MiB) in a one-node session, so that it is not measured as the first model's
        memory."""
        so = ort.SessionOptions()
        so.log_severity_level = ORT_FATAL
        ort.InferenceSession(PRIME_MODEL, sess_options=so, providers=["CPUExecutionProvider"])

    @staticmethod
    def estimate(path: Path, pipeline: Pipeline | None = None) -> int:
        """Bytes a load takes at its peak: the session's copy of the weights and MLAS's
        prepacked copy (measured 2.0x for a 16 MiB MatMul, which keeps 1.0x once onnxruntime
        has freed the initializer it prepacked), plus the runtime's own allocations; measured
        loads raise it per model, never lower it below this. Fusing a pipeline holds two more
        copies while it runs: the loaded graph and its serialised form."""
        copies = 4 if pipeline else 2
        return copies * weight_bytes(path) + SESSION_OVERHEAD_BYTES

    @property
    def signature(self) -> Signature:
        return self._signature

    @property
    def providers(self) -> list[str]:
        return list(self._session.get_providers())

    def run(
        self, inputs: Arrays, into: Mapping[str, np.ndarray[Any, Any]] | None = None
    ) -> dict[str, np.ndarray[Any, Any]]:
        feed = inputs if isinstance(inputs, dict) else dict(inputs)
        if into:
            return self._run_into(feed, into)
        results = self._session.run(self._output_names, feed)
        return dict(zip(self._output_names, results, strict=True))

    def _run_into(
        self, feed: dict[str, np.ndarray[Any, Any]], into: Mapping[str, np.ndarray[Any, Any]]
    ) -> dict[str, np.ndarray[Any, Any]]:
        """A run through an IO binding: the outputs in ``into`` are bound to those arrays'
        memory (a client's shared memory), so onnxruntime writes them there, no copy after."""
        binding = self._session.io_binding()
        for name, array in feed.items():
            binding.bind_cpu_input(name, array)
        for name in self._output_names:
            target = into.get(name)
            if target is None:
                binding.bind_output(name, "cpu")
            else:
                pointer = target.__array_interface__["data"][0]
                binding.bind_output(name, "cpu", 0, target.dtype, list(target.shape), pointer)
        self._session.run_with_iobinding(binding)
        values = binding.get_outputs()
        return {
            name: into[name] if name in into else value.numpy()
            for name, value in zip(self._output_names, values, strict=True)
        }

    def close(self) -> None:
        del self._session
