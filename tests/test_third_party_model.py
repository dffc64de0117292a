"""A real third-party model end to end: silero-vad's stateful ONNX network."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from tests.conftest import DaemonFactory

CHUNK = 512  # samples per call at 16 kHz


def test_silero_vad_through_edged_equals_direct_onnxruntime(
    start_daemon: DaemonFactory, silero_model: Path
) -> None:
    daemon = start_daemon({"models": {"vad": {"path": str(silero_model)}}})
    session = ort.InferenceSession(str(silero_model), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(7)
    t = np.arange(CHUNK * 8) / 16000
    audio = (0.5 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(t.size)).astype(
        np.float32
    )
    sr = np.array(16000, dtype=np.int64)
    state_edged = state_direct = np.zeros((2, 1, 128), np.float32)
    with daemon.client() as client:
        for start in range(0, audio.size, CHUNK):
            chunk = audio[np.newaxis, start : start + CHUNK]
            result = client.infer("vad", {"input": chunk, "state": state_edged, "sr": sr})
            prob, state_direct = session.run(
                None, {"input": chunk, "state": state_direct, "sr": sr}
            )
            np.testing.assert_array_equal(result["output"], prob)
            np.testing.assert_array_equal(result["stateN"], state_direct)
            state_edged = result["stateN"]
    assert not np.all(state_edged == 0)  # the state really evolved across calls
