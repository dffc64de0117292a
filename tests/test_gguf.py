"""GGUF language models through a live daemon: streaming, sampling, stops, cancel, embeddings."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq

from edged import protocol
from edged.client import AsyncClient, Completion
from edged.errors import BusyError, ContextOverflow, OpNotSupported, UnknownRequest
from edged.testing import DaemonProcess
from tests.conftest import Connect, DaemonFactory, direct_embeddings, llm_config

MAX_TOKENS = 24


@pytest.fixture
def llm_daemon(
    start_daemon: DaemonFactory, gguf_models: dict[str, Path], models_dir: Path
) -> DaemonProcess:
    return start_daemon(
        {
            "models": {
                "llm": llm_config(gguf_models["q8"]),
                "llm4": llm_config(gguf_models["q4"]),
                "emb": llm_config(gguf_models["embed"], gguf={"embedding": True, "n_batch": 64}),
                "demo": {"path": str(models_dir / "demo.onnx")},
            }
        }
    )


def direct_greedy(path: Path, prompt: str, max_tokens: int) -> str:
    """llama-cpp-python's own completion, in this process: the reference text."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=1, verbose=False)
    try:
        done: Any = llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0)
        return str(done["choices"][0]["text"])
    finally:
        llm.close()


@pytest.mark.parametrize("model, quant", [("llm", "q8"), ("llm4", "q4")])
def test_generate_streams_exactly_what_llama_cpp_generates(
    llm_daemon: DaemonProcess, gguf_models: dict[str, Path], model: str, quant: str
) -> None:
    with llm_daemon.client() as client:
        stream = client.generate(model, "hello world, the", max_tokens=MAX_TOKENS, temperature=0)
        pieces = list(stream)
    done = stream.completion
    assert done.finish_reason == "length"
    assert done.completion_tokens == MAX_TOKENS
    assert done.prompt_tokens == 5  # <s> ▁hello ▁world , ▁the
    assert done.text == "".join(pieces) and len(pieces) >= 1
    assert done.timing["ttft_us"] > 0 and done.timing["tokens_per_s"] > 0
    assert done.text == direct_greedy(gguf_models[quant], "hello world, the", MAX_TOKENS)


def test_a_seed_makes_sampling_repeatable(llm_daemon: DaemonProcess) -> None:
    def sample(seed: int) -> str:
        stream = client.generate("llm", "the cat", max_tokens=32, temperature=1.0, seed=seed)
        return stream.text().text

    with llm_daemon.client() as client:
        first, again, other = sample(7), sample(7), sample(8)
    assert first == again
    assert first != other


def test_sampling_settings_reach_llama_cpps_sampler(llm_daemon: DaemonProcess) -> None:
    def text(**sampling: Any) -> str:
        stream = client.generate("llm", "the cat", max_tokens=32, **sampling)
        return stream.text().text

    with llm_daemon.client() as client:
        greedy = text(temperature=0)
        # one candidate left: any temperature and seed gives the greedy text
        kept_one = {text(temperature=1.5, top_k=1, seed=seed) for seed in (1, 2, 3)}
        drawn = {text(temperature=1.5, seed=seed) for seed in (1, 2, 3)}
        penalised = text(temperature=0, repeat_penalty=3.0, frequency_penalty=2.0)
    assert kept_one == {greedy}
    assert drawn != {greedy}  # without top_k the same seeds sample other text
    assert penalised != greedy  # a tiny model repeats itself; penalties change that


def test_stop_sequences_end_the_text_before_them(llm_daemon: DaemonProcess) -> None:
    with llm_daemon.client() as client:
        full = client.generate("llm", "the dog", max_tokens=40, temperature=0).text().text
        stop = full[12:15]
        cut = full.index(stop)
        stream = client.generate("llm", "the dog", max_tokens=40, temperature=0, stop=[stop])
        pieces = list(stream)
    assert stream.completion.finish_reason == "stop"
    assert stream.completion.text == full[:cut]
    assert all(stop not in piece for piece in pieces)


def test_closing_a_stream_cancels_it_and_frees_the_model(llm_daemon: DaemonProcess) -> None:
    with llm_daemon.client() as client:
        with client.generate("llm", "the sun", max_tokens=400, temperature=0) as stream:
            for count, _ in enumerate(stream, start=1):
                if count == 3:
                    break
        assert stream.completion.finish_reason == "cancelled"
        assert stream.completion.completion_tokens < 400
        stream = client.generate("llm", "the sun", max_tokens=400, temperature=0)
        next(iter(stream))
        stream.cancel()
        pieces = list(stream)  # the rest arrives up to the cancellation, then the stream ends
        assert stream.completion.finish_reason == "cancelled"
        assert stream.completion.text.endswith("".join(pieces))
        after = client.generate("llm", "the sun", max_tokens=4, temperature=0).text()
        assert after.finish_reason == "length" and after.completion_tokens == 4


def generate_header(request_id: int, **fields: Any) -> bytes:
    header = {"v": 1, "id": request_id, "op": "generate", "model": "llm", "prompt": "the moon"}
    header.update(fields)
    return msgpack.packb(header)


def read_until_final(sock: zmq.Socket[Any], request_id: int) -> dict[str, Any]:
    """Read replies until ``request_id``'s final one (other replies are skipped)."""
    while True:
        reply = msgpack.unpackb(sock.recv())
        if reply["id"] == request_id and not reply.get("more"):
            return dict(reply)


def test_one_generation_at_a_time_queued_ones_cancel_and_busy_beyond(
    start_daemon: DaemonFactory, gguf_models: dict[str, Path], connect: Connect
) -> None:
    daemon = start_daemon({"models": {"llm": llm_config(gguf_models["q8"], queue_depth=1)}})
    sock = connect(daemon.endpoint)
    sock.setsockopt(zmq.RCVTIMEO, 20_000)
    sock.send(generate_header(1, max_tokens=480, temperature=0))
    first = msgpack.unpackb(sock.recv())  # 1 is running once a piece of it arrives
    assert first["id"] == 1 and first["more"] is True
    sock.send(generate_header(2, max_tokens=4))  # queued behind 1
    sock.send(generate_header(3, max_tokens=4))  # the queue holds one: BUSY
    busy = read_until_final(sock, 3)
    assert busy["error"]["code"] == BusyError.code
    sock.send(msgpack.packb({"v": 1, "id": 4, "op": "cancel", "target": 2}))
    queued = read_until_final(sock, 2)  # a queued request ends at once, before the cancel's reply
    assert read_until_final(sock, 4)["cancelled"] == 2
    assert queued["finish_reason"] == "cancelled"
    assert queued["usage"]["completion_tokens"] == 0
    sock.send(msgpack.packb({"v": 1, "id": 5, "op": "cancel", "target": 1}))
    assert read_until_final(sock, 5)["cancelled"] == 1
    running = read_until_final(sock, 1)
    assert running["finish_reason"] == "cancelled"
    assert 0 < running["usage"]["completion_tokens"] < 480
    sock.send(msgpack.packb({"v": 1, "id": 6, "op": "cancel", "target": 1}))
    assert read_until_final(sock, 6)["error"]["code"] == UnknownRequest.code


def test_cancel_only_reaches_the_requests_of_the_same_connection(
    llm_daemon: DaemonProcess, connect: Connect
) -> None:
    owner, other = connect(llm_daemon.endpoint), connect(llm_daemon.endpoint)
    for sock in (owner, other):
        sock.setsockopt(zmq.RCVTIMEO, 20_000)
    owner.send(generate_header(1, max_tokens=100))
    assert msgpack.unpackb(owner.recv())["id"] == 1
    other.send(msgpack.packb({"v": 1, "id": 2, "op": "cancel", "target": 1}))
    assert read_until_final(other, 2)["error"]["code"] == UnknownRequest.code
    assert read_until_final(owner, 1)["finish_reason"] == "length"


VANISHING_CLIENT = """
import os, sys
from edged.client import Client
client = Client(sys.argv[1], timeout=20)
stream = client.generate("llm", "the tree", max_tokens=480, temperature=0, trace="vanish-1")
next(iter(stream))
print("streaming", flush=True)
os._exit(0)  # gone mid-stream, without a cancel
"""


def test_a_client_vanishing_mid_stream_stops_its_generation(llm_daemon: DaemonProcess) -> None:
    subprocess.run(
        [sys.executable, "-c", VANISHING_CLIENT, llm_daemon.endpoint],
        check=True,
        timeout=60,
        capture_output=True,
    )
    deadline = time.monotonic() + 20
    while "has gone; stopping" not in llm_daemon.log():
        assert time.monotonic() < deadline, llm_daemon.log()
        time.sleep(0.05)
    with llm_daemon.client() as client:
        assert client.generate("llm", "the", max_tokens=3).text().completion_tokens == 3
    with llm_daemon.control() as control:  # the log record about the request carries its trace
        records = control.command("logs", last=100)["records"]
    assert any(r["trace"] == "vanish-1" and "has gone" in r["message"] for r in records)


def test_context_overflow_and_wrong_ops_are_refused_and_serving_goes_on(
    llm_daemon: DaemonProcess,
) -> None:
    with llm_daemon.client() as client:
        with pytest.raises(ContextOverflow, match="exceed model 'llm''s n_ctx 512"):
            client.generate("llm", "hello " * 400, max_tokens=200).text()
        with pytest.raises(ContextOverflow, match="n_ctx 512"):
            client.generate("llm", "hi", max_tokens=600).text()
        with pytest.raises(OpNotSupported, match="use generate, chat or embed, not infer"):
            client.infer("llm", {"x": np.zeros((1, 16), np.float32)})
        with pytest.raises(OpNotSupported, match="ONNX model: use infer, not generate"):
            client.generate("demo", "hello").text()
        with pytest.raises(OpNotSupported, match="use generate or chat, not embed"):
            client.embed("llm", "hello")
        with pytest.raises(OpNotSupported, match="embedding model: use embed"):
            client.generate("emb", "hello").text()
        with pytest.raises(ContextOverflow, match="embeds at most 64"):
            client.embed("emb", ["hello", "the " * 100])
        assert client.generate("llm", "hello", max_tokens=2).text().completion_tokens == 2


def test_embeddings_match_llama_cpp_mean_pooling(
    llm_daemon: DaemonProcess, gguf_models: dict[str, Path]
) -> None:

    with llm_daemon.client() as client:
        vectors = client.embed("emb", ["hello world", "the cat"])
        again = client.embed("emb", "hello world")
        described = client.describe("emb")
    assert vectors.dtype == np.float32 and vectors.shape == (2, 256)
    assert np.all(np.isfinite(vectors)) and not np.allclose(vectors[0], vectors[1])
    np.testing.assert_allclose(again[0], vectors[0], rtol=1e-5)  # batched alone: float noise
    assert described["ops"] == ["embed"] and described["llm"]["n_embd"] == 256
    direct = direct_embeddings(gguf_models["embed"], ["hello world", "the cat"])
    np.testing.assert_allclose(vectors, direct, rtol=1e-4, atol=1e-5)


def test_async_client_streams_and_leaving_early_cancels(llm_daemon: DaemonProcess) -> None:
    async def scenario() -> tuple[list[str], Completion, Completion]:
        async with AsyncClient(llm_daemon.endpoint, timeout=20) as client:
            full = Completion()
            pieces = [
                text
                async for text in client.generate(
                    "llm", "the house", max_tokens=16, temperature=0, completion=full
                )
            ]
            cut = Completion()
            async for _ in client.generate("llm", "the house", max_tokens=400, completion=cut):
                break
            after = Completion()
            async for _ in client.generate("llm", "a", max_tokens=3, completion=after):
                pass
            return pieces, full, after

    pieces, full, after = asyncio.run(scenario())
    assert "".join(pieces) == full.text and full.completion_tokens == 16
    assert after.completion_tokens == 3  # the abandoned stream no longer holds the model


def test_files_that_are_not_gguf_fail_to_load_with_a_reason(
    start_daemon: DaemonFactory, gguf_models: dict[str, Path], tmp_path: Path
) -> None:
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"this is not a model" * 100)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(gguf_models["q8"].read_bytes()[:200_000])
    daemon = start_daemon(
        {
            "models": {
                "garbage": {"path": str(garbage)},
                "truncated": {"path": str(truncated)},
                "llm": llm_config(gguf_models["q8"]),
            }
        }
    )
    with daemon.client() as client:
        for name, reason in (("garbage", "not a readable GGUF"), ("truncated", "truncated")):
            with pytest.raises(protocol.EdgedError) as info:
                client.generate(name, "hello").text()
            assert info.value.code == "LOAD_FAILED" and reason in str(info.value)
        assert client.generate("llm", "hello", max_tokens=2).text().completion_tokens == 2


def test_edged_infer_streams_a_prompt_and_embeds_text(llm_daemon: DaemonProcess) -> None:
    def edged(*args: str) -> Any:
        command = [sys.executable, "-m", "edged", "infer", *args]
        command += ["--socket", llm_daemon.endpoint, "--json"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)
        return json.loads(done.stdout)

    generated = edged("llm", "--prompt", "hello", "--max-tokens", "5", "--temperature", "0")
    assert generated["completion_tokens"] == 5 and generated["finish_reason"] == "length"
    with llm_daemon.client() as client:
        assert (
            client.generate("llm", "hello", max_tokens=5, temperature=0).text().text
            == (generated["text"])
        )
    embedded = edged("emb", "--embed", "hello", "--embed", "world")
    assert np.asarray(embedded["embedding"]).shape == (2, 256)


def test_a_request_cancelled_while_its_model_loads_never_runs(
    start_daemon: DaemonFactory, gguf_models: dict[str, Path], connect: Connect
) -> None:
    daemon = start_daemon({"models": {"llm": llm_config(gguf_models["q8"], preload=False)}})
    sock = connect(daemon.endpoint)
    sock.setsockopt(zmq.RCVTIMEO, 20_000)
    sock.send(generate_header(1, max_tokens=400))  # starts the load
    sock.send(msgpack.packb({"v": 1, "id": 2, "op": "cancel", "target": 1}))
    assert read_until_final(sock, 2)["cancelled"] == 1
    final = read_until_final(sock, 1)
    assert final["finish_reason"] == "cancelled"
    assert final["usage"]["completion_tokens"] < 400


def test_sigterm_lets_a_running_generation_finish(llm_daemon: DaemonProcess) -> None:
    with llm_daemon.client() as client:
        stream = client.generate("llm", "the red", max_tokens=300, temperature=0)
        next(iter(stream))
        assert llm_daemon.proc is not None
        llm_daemon.proc.send_signal(signal.SIGTERM)
        done = stream.text()
    assert done.finish_reason == "length" and done.completion_tokens == 300
    assert llm_daemon.wait() == 0


def test_selftest_runs_every_kind_of_loaded_model(llm_daemon: DaemonProcess) -> None:
    with llm_daemon.control() as control:
        result = control.command("selftest", timeout=120)
    assert result["ok_all"] is True
    assert result["results"] == {name: "ok" for name in ("llm", "llm4", "emb")}  # loaded ones
