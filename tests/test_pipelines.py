"""Pipelines declared in config, served by a live daemon: a raw camera frame goes in, the
model's answers come out of one fused session, exactly as the same pipeline run in-process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edged.errors import ModelLoadError, ShapeMismatch
from edged.steps.frame import FrameSteps
from edged.steps.pipeline import Pipeline, Postprocess
from edged.steps.scores import ScoreSteps
from tests.conftest import DaemonFactory, store_versions

RNG = np.random.default_rng(11)
PREPROCESS = {"height": 224, "width": 224, "bgr": True, "scale": 1 / 255, "letterbox": True}
POSTPROCESS = {"scores": {"activation": "softmax", "top_k": 3}}


def in_process(
    model: Path, frame: np.ndarray[Any, Any], preprocess: dict[str, Any] = PREPROCESS
) -> list[np.ndarray[Any, Any]]:
    pipeline = Pipeline(
        FrameSteps(**preprocess), Postprocess(scores=ScoreSteps(activation="softmax", top_k=3))
    )
    fused = pipeline.apply(onnx.load(model)).SerializeToString()
    session = ort.InferenceSession(fused, providers=["CPUExecutionProvider"])
    return list(session.run(["scores", "classes"], {"frame": frame}))


def test_a_frame_through_a_declared_pipeline_equals_the_same_pipeline_in_process(
    start_daemon: DaemonFactory, models_dir: Path
) -> None:
    model = models_dir / "image.onnx"
    declared = {"path": str(model), "preprocess": PREPROCESS, "postprocess": POSTPROCESS}
    daemon = start_daemon({"models": {"camera": declared}})
    with daemon.client() as client:
        for shape in [(480, 640, 3), (1080, 1920, 3), (300, 200, 3)]:
            frame = RNG.integers(0, 256, shape, dtype=np.uint8)
            result = client.infer("camera", {"frame": frame})
            scores, classes = in_process(model, frame)
            np.testing.assert_array_equal(result["scores"], scores)
            np.testing.assert_array_equal(result["classes"], classes)
            assert result["classes"].shape == (1, 3) and result["classes"].dtype == np.int64
        with pytest.raises(ShapeMismatch, match="frame"):
            client.infer("camera", {"frame": RNG.integers(0, 256, (48, 64, 4), dtype=np.uint8)})
        assert client.ping()  # still serving
    with daemon.control() as control:
        described = control.command("describe", model="camera")
    inputs = described["signature"]["inputs"]
    outputs = described["signature"]["outputs"]
    assert [(spec["name"], spec["dtype"], spec["shape"]) for spec in inputs] == [
        ("frame", "uint8", [None, None, 3])
    ]
    assert [spec["name"] for spec in outputs] == ["scores", "classes"]
    assert described["preprocess"] == "frame -> letterbox 224x224 nchw"
    assert described["postprocess"] == "scores"


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"preprocess": {"height": 224}}, "missing key 'models.camera.preprocess.width'"),
        (
            {"preprocess": {"height": 224, "width": 224, "layout": "hwc"}},
            "'models.camera.preprocess': layout must be one of",
        ),
        ({"postprocess": {"outputs": ["logits"]}}, "exactly one of 'scores' or 'boxes'"),
        ({"postprocess": {"scores": {"top_k": 0}}}, "'models.camera.postprocess.scores': top_k"),
    ],
)
def test_a_bad_pipeline_declaration_stops_the_start_naming_the_key(
    tmp_path: Path, models_dir: Path, model: dict[str, Any], message: str
) -> None:
    from edged.config import parse_config
    from edged.errors import ConfigError

    declared = {"models": {"camera": {"path": str(models_dir / "image.onnx"), **model}}}
    with pytest.raises(ConfigError, match=message):
        parse_config(declared, source="edged.toml", base_dir=tmp_path)


def test_a_pipeline_that_does_not_fit_its_model_fails_its_load_with_the_reason(
    start_daemon: DaemonFactory, models_dir: Path
) -> None:
    declared = {
        "path": str(models_dir / "image.onnx"),
        "preprocess": {**PREPROCESS, "input": "pixels"},
    }
    daemon = start_daemon({"models": {"camera": declared}})
    with daemon.client() as client:
        with pytest.raises(ModelLoadError, match="no input 'pixels'; it takes image"):
            client.infer("camera", {"frame": RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8)})
        assert client.ping()


def test_a_bundle_brings_its_versions_pipeline_and_a_bad_one_is_refused(
    start_daemon: DaemonFactory, models_dir: Path, tmp_path: Path
) -> None:
    import tomli_w

    from edged.errors import BadBundle
    from edged.ota import bundle
    from tests.bundles import install, signing_keys

    keys = signing_keys(tmp_path)
    store_versions(tmp_path / "d", "camera", [models_dir / "image.onnx"])
    stretched = {**PREPROCESS, "letterbox": False}
    declared = {"preload": True, "preprocess": stretched, "postprocess": POSTPROCESS}
    config = {
        "ota": {"trusted_keys": str(keys["trusted"]), "health_window_s": 0},
        "models": {"camera": declared},
    }
    daemon = start_daemon(config, workdir=tmp_path / "d")
    pipeline = tmp_path / "camera.toml"
    pipeline.write_text(tomli_w.dumps({"preprocess": PREPROCESS, "postprocess": POSTPROCESS}))
    broken = tmp_path / "broken.toml"
    broken.write_text(tomli_w.dumps({"preprocess": {**PREPROCESS, "layout": "chw"}}))
    bundles = {}
    for version, steps in ((2, broken), (3, pipeline)):
        bundles[version] = tmp_path / f"camera-{version}.bundle"
        bundle.build(bundles[version], "camera", version, models_dir / "image.onnx", pipeline=steps)
        bundle.sign(bundles[version], keys["private"])
    with pytest.raises(BadBundle, match=r"pipeline is not valid: .*layout must be one of"):
        install(daemon, bundles[2])
    frame = RNG.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    with daemon.client() as client:
        before = client.infer("camera", {"frame": frame})
    assert before.version == 1  # the declared pipeline, the version's own being refused
    _, classes = in_process(models_dir / "image.onnx", frame, stretched)
    np.testing.assert_array_equal(before["classes"], classes)
    assert install(daemon, bundles[3])["outcome"] == "installed"
    with daemon.client() as client:
        result = client.infer("camera", {"frame": frame})
    assert result.version == 3
    scores, classes = in_process(models_dir / "image.onnx", frame)
    np.testing.assert_array_equal(result["scores"], scores)
    np.testing.assert_array_equal(result["classes"], classes)


@pytest.mark.parametrize(
    "preprocess",
    [PREPROCESS, {**PREPROCESS, "letterbox": False, "crop": [100, 200, 300, 300]}],
)
def test_a_pipelines_warm_up_run_passes_as_a_swap_needs_it(
    models_dir: Path, preprocess: dict[str, Any]
) -> None:
    from edged.config import OnnxOptions
    from edged.models.onnx import OnnxBackend
    from edged.models.validation import rehearse_tensors

    model = str(models_dir / "image.onnx")
    pipeline = Pipeline(FrameSteps(**preprocess), Postprocess(scores=ScoreSteps()))
    backend = OnnxBackend.load(Path(model), OnnxOptions(), None, pipeline)
    rehearse_tensors("camera", backend, model)  # raises SwapRejected if the run fails


def test_golden_vectors_shadows_and_swaps_work_on_the_fused_model(
    start_daemon: DaemonFactory, models_dir: Path, tmp_path: Path
) -> None:
    import time

    from edged.demo import build_image_model
    from edged.errors import SwapRejected

    first = models_dir / "image.onnx"
    other = build_image_model(tmp_path / "other.onnx", seed=1)
    frame = RNG.integers(0, 256, (240, 320, 3), dtype=np.uint8)
    scores, classes = in_process(other, frame)
    right, wrong = tmp_path / "right.npz", tmp_path / "wrong.npz"
    np.savez(right, **{"input.frame": frame, "output.scores": scores})
    np.savez(wrong, **{"input.frame": frame, "output.scores": scores + 0.5})
    spoiled = tmp_path / "spoiled.onnx"
    spoiled.write_bytes(other.read_bytes())
    golden = {"other.onnx": right, "spoiled.onnx": wrong}
    store_versions(tmp_path / "d", "camera", [first, other, spoiled], **golden)
    declared = {"preload": True, "version": 1, "preprocess": PREPROCESS, "postprocess": POSTPROCESS}
    daemon = start_daemon({"models": {"camera": declared}}, workdir=tmp_path / "d")
    with daemon.control() as control, daemon.client() as client:
        control.command("shadow", model="camera", version=2)
        for _ in range(10):
            assert client.infer("camera", {"frame": frame}).version == 1
        deadline = time.monotonic() + 20
        while (shadow := control.command("models")["models"]["camera"]["candidate"]["shadow"])[
            "compared"
        ] < 10:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert shadow["failures"] == 0 and shadow["max_abs_diff"] > 0
        control.command("discard", model="camera")
        with pytest.raises(SwapRejected, match="golden"):
            control.command("swap", model="camera", version=3)
        control.command("swap", model="camera", version=2)
        result = client.infer("camera", {"frame": frame})
    assert result.version == 2
    np.testing.assert_array_equal(result["classes"], classes)
