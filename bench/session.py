"""The onnxruntime session of every path that is not edged (the floor, HTTP, bare RSS).

It imports nothing but onnxruntime so the bare-RSS process loads only what it must.
"""

from __future__ import annotations

import onnxruntime as ort


def open_session(model_path: str) -> ort.InferenceSession:
    """A session set up like edged's defaults (``OnnxOptions`` in edged/config.py).

    One intra-op and one inter-op thread, every graph optimisation, CPU only: with other
    settings the floor would measure a different model run than the daemon performs.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(
        model_path, sess_options=options, providers=["CPUExecutionProvider"]
    )
