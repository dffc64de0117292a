"""The ``edged`` command line as a newcomer meets it: the first-start hint works for every kind
of model, ``infer --random`` takes shapes, a tiny GGUF to try, a closed pipe."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper, save

from edged.testing import DaemonProcess
from tests.conftest import DaemonFactory, llm_config
from tests.test_edgectl import closed_pipe

EDGED = [sys.executable, "-m", "edged"]


def build_any_size_image_model(path: Path) -> Path:
    """image float32[batch, 3, h, w] -> features float32[batch, 4]: a 3x3 convolution, so an
    image must be at least 3x3 (random inputs with every dynamic dimension 1 fail)."""
    weight = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["image", "w"], ["c"]),
        helper.make_node("GlobalAveragePool", ["c"], ["p"]),
        helper.make_node("Flatten", ["p"], ["features"]),
    ]
    graph = helper.make_graph(
        nodes,
        "any-size",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, "h", "w"])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 4])],
        initializer=[numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    save(model, str(path))
    return path


def infer(daemon: DaemonProcess, *args: str) -> subprocess.CompletedProcess[str]:
    command = [*EDGED, "infer", *args, "--socket", daemon.endpoint, "--timeout", "30"]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture
def image_daemon(start_daemon: DaemonFactory, tmp_path: Path) -> DaemonProcess:
    model = build_any_size_image_model(tmp_path / "any.onnx")
    return start_daemon({"models": {"img": {"path": str(model)}}})


def test_random_inputs_take_the_shapes_given(image_daemon: DaemonProcess) -> None:
    done = infer(image_daemon, "img", "--random", "--shape", "image=2x3x8x8", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["outputs"]["features"]["shape"] == [2, 4]
    assert infer(image_daemon, "img", "--random").returncode == 1  # 1x1 images: too small


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--random", "--shape", "pixels=1x3x8x8"], 1, "--shape names no input of the model"),
        (["--shape", "image=1x3x8x8"], 2, "--shape gives the shape of --random inputs"),
        (["--random", "--shape", "image=1x3xbig"], 2, "takes NAME=AxBxC"),
    ],
)
def test_wrong_shapes_are_refused_clearly(
    image_daemon: DaemonProcess, args: list[str], code: int, message: str
) -> None:
    done = infer(image_daemon, "img", *args)
    assert done.returncode == code
    assert message in done.stderr.splitlines()[-1]


def hint(daemon: DaemonProcess) -> list[str]:
    """The command the daemon's first-start log line suggests."""
    found = re.search(r" try: (.*)$", daemon.log(), re.MULTILINE)
    assert found, daemon.log()
    return shlex.split(found[1])


def test_the_first_start_hint_works_for_an_onnx_model(image_daemon: DaemonProcess) -> None:
    command = hint(image_daemon)
    assert command[1:4] == ["infer", "img", "--random"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1  # this model needs --shape; the demo model does not
    assert "RUN_FAILED" in done.stderr


#: per kind of GGUF model: the gguf_models entry, its options, what the hint must say and
#: what the hinted command prints
GGUF_KINDS = {
    "chat, generate": ("q8", {}, ["--prompt", "Hello"], "generated tokens"),
    "embed": ("embed", {"embedding": True}, ["--embed", "hello"], "'hello': float32["),
}


@pytest.mark.parametrize("kind", GGUF_KINDS)
def test_the_first_start_hint_works_for_a_gguf_model(
    start_daemon: DaemonFactory, gguf_models: dict[str, Path], kind: str
) -> None:
    model, gguf, args, printed = GGUF_KINDS[kind]
    daemon = start_daemon({"models": {"llm": llm_config(gguf_models[model], gguf=gguf)}})
    command = hint(daemon)
    assert command[1:3] == ["infer", "llm"] and command[3:5] == args
    limit = ["--max-tokens", "4"] if kind != "embed" else []
    done = subprocess.run(
        [*command, *limit], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert printed in done.stdout + done.stderr
    random = infer(daemon, "llm", "--random")
    assert random.returncode == 1
    assert random.stderr.splitlines() == [
        f"edged: OP_NOT_SUPPORTED: llm is a language model ({kind}): it takes text, not "
        f"tensors, so --random has nothing to fill; send text with {args[0]} TEXT"
    ]


@pytest.mark.gguf
def test_tinyllama_writes_a_gguf_that_edged_serves(
    start_daemon: DaemonFactory, tmp_path: Path
) -> None:
    out = tmp_path / "tiny.gguf"
    done = subprocess.run(
        [sys.executable, "-m", "edged.tinyllama", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert f'path = "{out}"' in done.stdout  # what to put in edged.toml
    daemon = start_daemon({"models": {"tiny": llm_config(out)}})
    with daemon.client(timeout=30) as client:
        completion = client.generate("tiny", "Hello", max_tokens=8).text()
        chatted = client.chat(
            "tiny",
            [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}],
            max_tokens=8,
            temperature=0,
        ).text()
    assert completion.completion_tokens == 8 and completion.text
    chat = infer(
        daemon,
        "tiny",
        "--chat",
        "hello",
        "--system",
        "be brief",
        "--max-tokens",
        "8",
        "--temperature",
        "0",
        "--json",
    )
    assert chat.returncode == 0, chat.stderr
    shown = json.loads(chat.stdout)
    assert (shown["text"], shown["prompt_tokens"]) == (chatted.text, chatted.prompt_tokens)


def test_a_closed_pipe_ends_edged_quietly(tmp_path: Path) -> None:
    config = tmp_path / "edged.toml"
    config.write_text("")
    done = closed_pipe([*EDGED, "config", "check", str(config)])
    assert done.stderr == ""
    assert done.returncode == 1
