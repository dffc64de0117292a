"""The OpenAI-compatible HTTP endpoint through a live daemon, spoken to by OpenAI's own client:
the same text as the daemon's own protocol, OpenAI's shapes and errors, cancellation when a
client hangs up, and where (and whether) it listens."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edged.cli import EXIT_CONFIG
from edged.config import Binding, HttpConfig
from edged.errors import ConfigError
from edged.http.binding import check_listen
from edged.testing import DaemonExited, DaemonProcess
from edged.tinybert import build_tiny_bert
from tests.conftest import DaemonFactory, free_port, llm_config

openai = pytest.importorskip("openai")

PROMPT = "hello world, the"
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat"}]
MAX_TOKENS = 24
#: a context the tiny model takes a good second to fill: what a cancellation cuts short
N_CTX = 2048
LONG = N_CTX - 48


def http_config(port: int, **http: Any) -> dict[str, Any]:
    return {"listen": f"127.0.0.1:{port}", "max_body_mb": 1, **http}


@pytest.fixture(scope="module")
def daemon(
    tmp_path_factory: pytest.TempPathFactory, gguf_models: dict[str, Path], models_dir: Path
) -> Iterator[DaemonProcess]:
    """A language model, an embedding model, an ONNX text encoder and an ONNX tensor model,
    with HTTP on a free port."""
    encoder = build_tiny_bert(tmp_path_factory.mktemp("bert") / "encoder.onnx")
    config = {
        "http": http_config(free_port()),
        "models": {
            "llm": llm_config(gguf_models["q8"], gguf={"n_ctx": N_CTX}),
            "emb": llm_config(gguf_models["embed"], gguf={"embedding": True, "n_batch": 64}),
            "bert": {"path": str(encoder), "embed": {"normalize": True}},
            "demo": {"path": str(models_dir / "demo.onnx")},
        },
    }
    with DaemonProcess(tmp_path_factory.mktemp("http"), config) as started:
        yield started


@pytest.fixture(scope="module")
def base_url(daemon: DaemonProcess) -> str:
    return f"http://{daemon.config['http']['listen']}/v1"


@pytest.fixture
def api(base_url: str) -> Iterator[Any]:
    with openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=30) as client:
        yield client


def post(base_url: str, path: str, body: bytes, content_type: str) -> tuple[int, Any]:
    """A raw POST: its status and JSON body."""
    host = base_url.split("/")[2]
    connection = http.client.HTTPConnection(host, timeout=30)
    try:
        connection.request("POST", f"/v1{path}", body, {"Content-Type": content_type})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_models_lists_the_models_that_serve_text(api: Any) -> None:
    assert {model.id for model in api.models.list()} == {"llm", "emb", "bert"}
    assert api.models.retrieve("llm").owned_by == "edged"
    with pytest.raises(openai.NotFoundError):
        api.models.retrieve("demo")  # ONNX: served on the daemon's own protocol only


def test_a_completion_is_the_daemons_own_generation(api: Any, daemon: DaemonProcess) -> None:
    with daemon.client() as client:
        own = client.generate("llm", PROMPT, max_tokens=MAX_TOKENS, temperature=0).text()
    done = api.completions.create(model="llm", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    assert done.object == "text_completion" and done.model == "llm"
    (choice,) = done.choices
    assert choice.text == own.text and choice.finish_reason == "length"
    assert done.usage.prompt_tokens == own.prompt_tokens
    assert done.usage.completion_tokens == MAX_TOKENS
    assert done.usage.total_tokens == own.prompt_tokens + MAX_TOKENS
    listed = api.completions.create(model="llm", prompt=[PROMPT], max_tokens=4, temperature=0)
    assert listed.choices[0].text == own.text[: len(listed.choices[0].text)]


def test_a_streamed_completion_is_the_daemons_own_stream(api: Any, daemon: DaemonProcess) -> None:
    with daemon.client() as client:
        own = client.generate("llm", PROMPT, max_tokens=MAX_TOKENS, temperature=0).text()
    stream = api.completions.create(
        model="llm",
        prompt=PROMPT,
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    *pieces, end, last = chunks
    assert "".join(chunk.choices[0].text for chunk in pieces) == own.text
    assert all(chunk.choices[0].finish_reason is None for chunk in pieces)
    assert end.choices[0].finish_reason == "length"
    assert last.choices == [] and last.usage.completion_tokens == MAX_TOKENS
    assert len({chunk.id for chunk in chunks}) == 1


def test_chat_is_the_daemons_own_chat(api: Any, daemon: DaemonProcess) -> None:
    with daemon.client() as client:
        own = client.chat("llm", MESSAGES, max_tokens=MAX_TOKENS, temperature=0).text()
    done = api.chat.completions.create(
        model="llm", messages=MESSAGES, max_completion_tokens=MAX_TOKENS, temperature=0
    )
    assert done.object == "chat.completion"
    (choice,) = done.choices
    assert choice.message.role == "assistant" and choice.message.content == own.text
    assert choice.finish_reason == "length"
    assert done.usage.prompt_tokens == own.prompt_tokens
    stream = api.chat.completions.create(
        model="llm", messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0, stream=True
    )
    *pieces, end = list(stream)
    assert pieces[0].choices[0].delta.role == "assistant"
    assert "".join(chunk.choices[0].delta.content for chunk in pieces) == own.text
    assert end.choices[0].finish_reason == "length" and end.usage is None


def test_log_probabilities_in_openais_shapes(api: Any) -> None:
    chat = api.chat.completions.create(
        model="llm", messages=MESSAGES, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 8
    assert "".join(entry.token for entry in content) == chat.choices[0].message.content
    for entry in content:  # greedy: the token taken is the likeliest
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].token == entry.token
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob) and entry.logprob < 0
        assert entry.bytes == list(entry.token.encode())
    text = api.completions.create(
        model="llm", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=3, stream=True
    )
    tokens, offsets = [], []
    for chunk in text:
        logprobs = chunk.choices[0].logprobs
        if logprobs is not None:
            assert all(len(alternatives) == 3 for alternatives in logprobs.top_logprobs)
            tokens += logprobs.tokens
            offsets += logprobs.text_offset
    assert len(tokens) == 8
    assert offsets[0] == len(PROMPT) and offsets[1] == len(PROMPT) + len(tokens[0])


def test_response_format_constrains_the_output_to_json(api: Any) -> None:
    done = api.chat.completions.create(
        model="llm",
        messages=MESSAGES,
        max_tokens=64,
        temperature=0,
        response_format={"type": "json_object"},
    )
    if done.choices[0].finish_reason == "stop":  # a tiny model may not close it in time
        assert isinstance(json.loads(done.choices[0].message.content), dict)
    else:
        assert done.choices[0].message.content.lstrip().startswith("{")


def test_embeddings_are_the_daemons_own(api: Any, daemon: DaemonProcess) -> None:
    texts = ["the cat", "a dog and a tree"]
    with daemon.client() as client:
        own = client.embed("emb", texts)
    done = api.embeddings.create(model="emb", input=texts)  # base64, as the client asks
    floats = api.embeddings.create(model="emb", input=texts, encoding_format="float")
    for result in (done, floats):
        assert [item.index for item in result.data] == [0, 1]
        got = np.array([item.embedding for item in result.data], np.float32)
        np.testing.assert_array_equal(got, own)
    assert done.usage.prompt_tokens == done.usage.total_tokens > 0
    bert = api.embeddings.create(model="bert", input=texts, encoding_format="float")
    with daemon.client() as client:
        own_bert = client.embed("bert", texts)
    got = np.array([item.embedding for item in bert.data], np.float32)
    np.testing.assert_array_equal(got, own_bert)  # an ONNX text encoder, the same way
    one = api.embeddings.create(model="emb", input="the cat", encoding_format="float")
    # alone rather than in a batch of two: llama.cpp's sums may round differently
    np.testing.assert_allclose(np.array(one.data[0].embedding, np.float32), own[0], rtol=1e-5)


def assert_error(
    caught: pytest.ExceptionInfo[Any], status: int, code: str, param: str | None = None
) -> None:
    error = caught.value
    assert error.status_code == status
    assert error.code == code and error.param == param
    assert error.body["message"] and error.type


def test_errors_in_openais_shape(api: Any) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        api.completions.create(model="nope", prompt=PROMPT)
    assert_error(caught, 404, "model_not_found")
    with pytest.raises(openai.BadRequestError) as caught:
        api.completions.create(model="llm", prompt=PROMPT, n=2)
    assert_error(caught, 400, "bad_request", "n")
    with pytest.raises(openai.BadRequestError) as caught:
        api.chat.completions.create(model="llm", messages=MESSAGES, temperature=-1)
    assert_error(caught, 400, "bad_request", "temperature")
    with pytest.raises(openai.BadRequestError) as caught:
        api.chat.completions.create(model="llm", messages=MESSAGES, extra_body={"mirostat": 2})
    assert_error(caught, 400, "bad_request", "mirostat")
    with pytest.raises(openai.BadRequestError) as caught:
        tool = {"type": "function", "function": {"name": "f", "parameters": {}}}
        api.chat.completions.create(model="llm", messages=MESSAGES, tools=[tool])
    assert "tool calls are not supported" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
        api.completions.create(model="llm", prompt=PROMPT, max_tokens=N_CTX, stream=True)
    assert_error(caught, 400, "context_length_exceeded")
    with pytest.raises(openai.BadRequestError) as caught:
        api.embeddings.create(model="llm", input="x")
    assert_error(caught, 400, "model_not_supported")


def test_malformed_bodies_are_refused_in_openais_shape(base_url: str) -> None:
    status, body = post(base_url, "/completions", b"{not json", "application/json")
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = post(base_url, "/completions", b"[]", "application/json")
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    status, body = post(base_url, "/completions", b'{"model": "llm"}', "text/plain")
    assert status == 400 and "application/json" in body["error"]["message"]
    big = json.dumps({"model": "llm", "prompt": "x" * (2 << 20)}).encode()
    status, body = post(base_url, "/completions", big, "application/json")
    assert status == 413 and body["error"]["code"] == "too_large"
    status, body = post(base_url, "/nowhere", b"{}", "application/json")
    assert status == 404 and body["error"]["code"] == "not_found"


def generated_tokens(daemon: DaemonProcess) -> int:
    with daemon.control() as control:
        text = control.command("metrics")["text"]
    found = re.search(
        r'^edged_generated_tokens_total\{model="llm",version="1"\} (\S+)$', text, re.M
    )
    return int(float(found[1])) if found else 0


def test_a_client_hanging_up_cancels_its_generation(api: Any, daemon: DaemonProcess) -> None:
    before = generated_tokens(daemon)
    stream = api.completions.create(
        model="llm", prompt=PROMPT, max_tokens=LONG, temperature=0, stream=True
    )
    next(iter(stream))
    stream.close()  # the connection closes mid-stream
    after = api.completions.create(model="llm", prompt=PROMPT, max_tokens=4, temperature=0)
    assert after.choices[0].finish_reason == "length"
    cut_short = generated_tokens(daemon) - before - 4
    assert 0 < cut_short < LONG


def test_a_stop_lets_a_stream_finish_and_takes_no_new_requests(
    start_daemon: DaemonFactory, gguf_models: dict[str, Path]
) -> None:
    port = free_port()
    model = llm_config(gguf_models["q8"], gguf={"n_ctx": N_CTX})
    daemon = start_daemon({"http": http_config(port), "models": {"llm": model}})
    with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none") as api:
        stream = api.completions.create(
            model="llm", prompt=PROMPT, max_tokens=LONG, temperature=0, stream=True
        )
        chunks = iter(stream)
        next(chunks)
        os.kill(daemon.pid, signal.SIGTERM)
        *_, end = chunks
        assert end.choices[0].finish_reason == "length"
        with pytest.raises(openai.APIConnectionError):
            api.with_options(max_retries=0).models.list()
    assert daemon.wait() == 0


def test_a_unix_socket_serves_plain_http(
    start_daemon: DaemonFactory, gguf_models: dict[str, Path], tmp_path_factory: Any
) -> None:
    path = tmp_path_factory.mktemp("u") / "http.sock"
    config = {"http": {"listen": f"unix:{path}"}, "models": {"llm": llm_config(gguf_models["q8"])}}
    daemon = start_daemon(config)
    body = json.dumps({"model": "llm", "prompt": PROMPT, "max_tokens": 4, "temperature": 0})
    request = (
        f"POST /v1/completions HTTP/1.1\r\nHost: edged\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n{body}"
    )
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(30)
        sock.connect(str(path))
        sock.sendall(request.encode())
        response = b"".join(iter(lambda: sock.recv(65536), b""))
    head, _, payload = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert json.loads(payload)["usage"]["completion_tokens"] == 4
    second = DaemonProcess(tmp_path_factory.mktemp("u2"), config)
    with pytest.raises(DaemonExited, match="another process listens there"):
        second.start()
    daemon.stop()
    assert not path.exists()


def test_only_loopback_unless_public(
    start_daemon: DaemonFactory, models_dir: Path, tmp_path: Path
) -> None:
    port = free_port()
    models = {"demo": {"path": str(models_dir / "demo.onnx")}}
    refused = DaemonProcess(tmp_path, {"http": {"listen": f"0.0.0.0:{port}"}, "models": models})
    with pytest.raises(DaemonExited, match=r"http\.public"):
        refused.start()
    assert refused.wait() == EXIT_CONFIG
    public = start_daemon({"http": {"listen": f"0.0.0.0:{port}", "public": True}, "models": models})
    with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none") as api:
        assert list(api.models.list()) == []  # an ONNX model serves no OpenAI endpoint
    public.stop()


@pytest.mark.parametrize(
    "listen, binding",
    [
        ("", None),
        ("127.0.0.1:8080", Binding(host="127.0.0.1", port=8080)),
        ("[::1]:8080", Binding(host="::1", port=8080)),
        ("localhost:1", Binding(host="localhost", port=1)),
        ("unix:/run/edged/http.sock", Binding(path="/run/edged/http.sock")),
    ],
)
def test_listen_addresses(listen: str, binding: Binding | None) -> None:
    assert check_listen(HttpConfig(listen=listen), "edged.toml") == binding


@pytest.mark.parametrize(
    "listen", ["8080", "127.0.0.1:", "127.0.0.1:70000", "unix:relative.sock", "10.0.0.1:80"]
)
def test_bad_listen_addresses(listen: str) -> None:
    with pytest.raises(ConfigError, match=r"edged\.toml: .http"):
        check_listen(HttpConfig(listen=listen), "edged.toml")


NO_AIOHTTP = """
import sys
import edged.cli, edged.daemon, edged.http.binding
from edged.config import HttpConfig
edged.http.binding.check_listen(HttpConfig(), "-")
assert "aiohttp" not in sys.modules, "aiohttp was imported"
sys.modules["aiohttp"] = None  # as if not installed
sys.exit(edged.cli.main(["serve", "-c", sys.argv[1]]))
"""


def test_aiohttp_is_loaded_only_to_serve_http(tmp_path: Path) -> None:
    config = tmp_path / "edged.toml"
    config.write_text(f'[daemon]\nruntime_dir = "{tmp_path}"\n[http]\nlisten = "127.0.0.1:1"\n')
    done = subprocess.run(
        [sys.executable, "-c", NO_AIOHTTP, str(config)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == EXIT_CONFIG, done.stderr
    assert "pip install 'edged[http]'" in done.stderr
