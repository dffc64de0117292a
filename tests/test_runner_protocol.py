"""Both kinds of model serve through one ``Runner`` protocol: the layers above never ask which
kind a runner is (mypy checks the structure where ``loading.BACKENDS`` builds runners; these
tests check real runners of both kinds at run time, and that no new kind check creeps in)."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from edged.config import GgufOptions, ModelConfig, OnnxOptions
from edged.errors import OpNotSupported
from edged.models.generation import GenerationRunner
from edged.models.onnx import OnnxBackend
from edged.models.registry import Runner
from edged.models.runner import ModelRunner

PACKAGE = Path(__file__).resolve().parents[1] / "edged"
#: the one kind check left: a shadow comparison hooks tensor jobs on both versions
KIND_CHECKS_ALLOWED = {"service.py": 1}


async def _serve(runner: Runner) -> None:
    """Start ``runner``, self-test it through the protocol, and close it."""
    runner.start()
    try:
        assert isinstance(runner, Runner)
        await runner.probe()
        assert not runner.busy
        assert runner.cancel(b"peer", 1) is False
    finally:
        runner.close()


def test_an_onnx_runner_is_a_runner(models_dir: Path) -> None:
    async def main() -> None:
        path = models_dir / "demo.onnx"
        backend = OnnxBackend.load(path, OnnxOptions())
        config = ModelConfig(path=str(path), max_batch=4)
        runner = ModelRunner("demo", 1, backend, config, asyncio.get_running_loop())
        assert runner.ops == {"infer"}
        assert runner.describe()["ops"] == ["infer"]
        with pytest.raises(OpNotSupported, match="ONNX model: use infer, not embed"):
            raise runner.unsupported("embed")
        await _serve(runner)

    asyncio.run(main())


@pytest.mark.parametrize(("model", "ops"), [("q8", ["chat", "generate"]), ("embed", ["embed"])])
def test_a_gguf_runner_is_a_runner(
    gguf_models: dict[str, Path], model: str, ops: list[str]
) -> None:
    from edged.models.gguf import GgufBackend

    async def main() -> None:
        options = GgufOptions(n_ctx=512, n_threads=1, embedding=ops == ["embed"])
        backend = GgufBackend.load(gguf_models[model], options)
        config = ModelConfig(path=str(gguf_models[model]), backend="gguf", gguf=options)
        runner = GenerationRunner("llm", 1, backend, config, asyncio.get_running_loop())
        assert runner.ops == set(ops)
        assert runner.describe()["ops"] == ops
        assert runner.warnings() == ()
        with pytest.raises(OpNotSupported, match="use generate, chat or embed, not infer"):
            raise runner.unsupported("infer")
        await _serve(runner)

    asyncio.run(main())


def test_no_layer_asks_which_kind_a_runner_is() -> None:
    pattern = re.compile(r"isinstance\(.*Runner")
    found = {
        path.name: len(pattern.findall(path.read_text()))
        for path in PACKAGE.rglob("*.py")
        if pattern.search(path.read_text())
    }
    assert found == KIND_CHECKS_ALLOWED
