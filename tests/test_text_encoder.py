"""ONNX text encoders through a live daemon: texts tokenized by the model's own tokenizer, run,
pooled and normalised into one vector per text by ``embed``, as a GGUF embedding model's."""

from __future__ import annotations

import unicodedata
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from edged.errors import ConfigError, ContextOverflow, ModelLoadError, OpNotSupported
from edged.testing import DaemonProcess
from edged.tinybert import MAX_POSITIONS, build_tiny_bert
from tests.conftest import DaemonFactory

TEXTS = ["Hello world, the cat!", "a red motor runs hot and fast", "Beijing 北京 café", "edge"]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("bert") / "encoder.onnx")


@pytest.fixture
def text_daemon(start_daemon: DaemonFactory, encoder: Path) -> DaemonProcess:
    path = str(encoder)
    return start_daemon(
        {
            "models": {
                "mean": {"path": path, "embed": {}},
                "cls": {"path": path, "embed": {"pooling": "cls", "normalize": True}},
                "last": {"path": path, "embed": {"pooling": "last"}},
                "short": {"path": path, "embed": {"max_length": 6}},
                "cut": {"path": path, "embed": {"max_length": 6, "truncate": True}},
            }
        }
    )


def direct(encoder: Path, texts: list[str], max_length: int | None = None) -> Any:
    """The tokenizer and onnxruntime in this process: token states and the attention mask."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(encoder.with_suffix(".tokenizer.json")))
    if max_length is not None:
        tokenizer.enable_truncation(max_length)
    encodings = tokenizer.encode_batch(texts)
    feeds = {
        "input_ids": np.array([e.ids for e in encodings]),
        "attention_mask": np.array([e.attention_mask for e in encodings]),
        "token_type_ids": np.array([e.type_ids for e in encodings]),
    }
    states = ort.InferenceSession(str(encoder)).run(None, feeds)[0]
    return states, feeds["attention_mask"]


def test_embeddings_equal_the_tokenizer_and_onnxruntime_in_process(
    text_daemon: DaemonProcess, encoder: Path
) -> None:
    states, mask = direct(encoder, TEXTS)
    weights = mask[..., None]
    mean = (states * weights).sum(axis=1) / weights.sum(axis=1)
    cls = states[:, 0] / np.linalg.norm(states[:, 0], axis=1, keepdims=True)
    last = states[np.arange(len(TEXTS)), mask.sum(axis=1) - 1]
    with text_daemon.client() as client:
        found = {name: client.embed(name, TEXTS) for name in ("mean", "cls", "last")}
        alone = np.concatenate([client.embed("mean", text) for text in TEXTS])
    np.testing.assert_allclose(found["mean"], mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(found["cls"], cls, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(found["last"], last, rtol=1e-5, atol=1e-5)
    assert found["mean"].dtype == np.float32 and found["mean"].shape == (len(TEXTS), 32)
    np.testing.assert_allclose(np.linalg.norm(found["cls"], axis=1), 1.0, rtol=1e-5)
    # padding never leaks: a text's vector is the same alone and beside longer ones
    np.testing.assert_allclose(alone, found["mean"], rtol=1e-5, atol=1e-5)
    assert not np.allclose(found["mean"][0], found["mean"][1])


def test_unicode_is_normalised_by_the_tokenizer(text_daemon: DaemonProcess) -> None:
    composed = unicodedata.normalize("NFC", "Café au lait")
    decomposed = unicodedata.normalize("NFD", "Café au lait")
    assert composed != decomposed
    with text_daemon.client() as client:
        vectors = client.embed("mean", [composed, decomposed, "cafe au lait"])
    np.testing.assert_allclose(vectors[0], vectors[1], rtol=1e-6)
    np.testing.assert_allclose(vectors[0], vectors[2], rtol=1e-6)  # accents stripped, as BERT


def test_a_long_text_is_refused_or_cut_as_configured(
    text_daemon: DaemonProcess, encoder: Path
) -> None:
    long = "the cat and the dog were in the house"
    with text_daemon.client() as client:
        with pytest.raises(ContextOverflow, match=r"input\[1\] is 11 tokens; .* at most 6"):
            client.embed("short", ["edge", long])
        cut = client.embed("cut", [long])
        assert client.embed("short", "edge").shape == (1, 32)  # still serving
    states, mask = direct(encoder, [long], max_length=6)
    assert mask.shape == (1, 6)  # [CLS] the cat and the [SEP]: the tokenizer's own cut
    np.testing.assert_allclose(cut[0], states[0].mean(axis=0), rtol=1e-5, atol=1e-5)


def test_an_encoder_describes_itself_and_still_serves_infer(text_daemon: DaemonProcess) -> None:
    with text_daemon.client() as client:
        described = client.describe("mean")
        result = client.infer(
            "mean",
            {
                "input_ids": np.array([[2, 5, 3]]),
                "attention_mask": np.ones((1, 3), np.int64),
                "token_type_ids": np.zeros((1, 3), np.int64),
            },
        )
    assert described["ops"] == ["embed", "infer"]
    assert described["embed"] == {
        "max_length": MAX_POSITIONS,  # from the tokenizer's truncation setting
        "truncate": False,
        "pooling": "mean",
        "normalize": False,
        "output": "last_hidden_state",
    }
    assert result.outputs["last_hidden_state"].shape == (1, 3, 32)


def test_a_model_without_a_text_interface_or_tokenizer_fails_its_load(
    start_daemon: DaemonFactory, encoder: Path, models_dir: Path, tmp_path: Path
) -> None:
    lonely = tmp_path / "lonely.onnx"
    lonely.write_bytes(encoder.read_bytes())  # no tokenizer beside it
    daemon = start_daemon(
        {
            "models": {
                "demo": {"path": str(models_dir / "demo.onnx"), "embed": {}},
                "lonely": {"path": str(lonely), "embed": {}},
                "other": {
                    "path": str(lonely),
                    "embed": {"tokenizer": str(encoder.with_suffix(".tokenizer.json"))},
                },
                "plain": {"path": str(models_dir / "demo.onnx")},
            }
        }
    )
    with daemon.client() as client:
        with pytest.raises(ModelLoadError, match=r"takes input_ids .* this model takes x"):
            client.embed("demo", "hello")
        with pytest.raises(ModelLoadError, match=r"cannot read the tokenizer .*tokenizer\.json"):
            client.embed("lonely", "hello")
        assert client.embed("other", "hello").shape == (1, 32)  # a tokenizer named in config
        with pytest.raises(OpNotSupported, match="ONNX model: use infer, not embed"):
            client.embed("plain", "hello")


def test_embed_options_that_fit_no_gguf_model_are_config_errors(tmp_path: Path) -> None:
    from edged.config import load_config

    config = tmp_path / "edged.toml"
    for table, message in (
        ("tokenizer = 't.json'", "'tokenizer' applies to ONNX models"),
        ("pooling = 'none'", "pooling 'none' applies to ONNX models"),
    ):
        config.write_text(
            f"[models.e]\npath = 'e.gguf'\ngguf = {{ embedding = true }}\nembed = {{ {table} }}\n"
        )
        with pytest.raises(ConfigError, match=message):
            load_config(config)
    config.write_text("[models.e]\npath = 'e.gguf'\nembed = { pooling = 'cls' }\n")
    with pytest.raises(ConfigError, match=r"gguf\.embedding = true"):
        load_config(config)


@pytest.mark.gguf
def test_onnx_and_gguf_embeddings_come_through_the_same_op(
    start_daemon: DaemonFactory, encoder: Path, gguf_models: dict[str, Path]
) -> None:
    from tests.conftest import direct_embeddings, llm_config

    gguf = gguf_models["embed"]
    embed = {"pooling": "mean", "normalize": True}
    daemon = start_daemon(
        {
            "models": {
                "onnx": {"path": str(encoder), "embed": embed},
                "gguf": llm_config(gguf, gguf={"embedding": True, "n_batch": 64}, embed=embed),
            }
        }
    )
    texts = ["hello world", "the red cat"]
    with daemon.client() as client:
        found = {name: client.embed(name, texts) for name in ("onnx", "gguf")}
    reference = direct_embeddings(gguf, texts)
    reference /= np.linalg.norm(reference, axis=1, keepdims=True)
    np.testing.assert_allclose(found["gguf"], reference, rtol=1e-4, atol=1e-5)
    for vectors in found.values():
        assert vectors.dtype == np.float32 and len(vectors) == 2
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
