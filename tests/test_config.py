"""config: typed, validated, and every error names the file and the dotted key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edged import paths
from edged.config import Config, find_config_file, load_config
from edged.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "edged.toml"
    path.write_text(text)
    return path


def test_no_file_gives_embedded_defaults() -> None:
    config = load_config(None)
    assert config == Config()
    assert config.models == {}
    assert config.server.max_message_bytes == 64 * 1024 * 1024


def test_full_model_declaration_is_typed_and_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[server]
tcp = ["tcp://127.0.0.1:5555"]
[models.vad]
path = "models/vad.onnx"
max_batch = 8
max_delay_us = 500
[models.vad.onnx]
providers = ["tensorrt", "cuda", "cpu"]
intra_op_threads = 2
""",
    )
    config = load_config(path)
    vad = config.models["vad"]
    assert vad.path == str(tmp_path / "models" / "vad.onnx")
    assert (vad.max_batch, vad.max_delay_us, vad.queue_depth) == (8, 500, 64)
    assert vad.onnx.providers == ("tensorrt", "cuda", "cpu")
    assert vad.onnx.intra_op_threads == 2
    assert config.server.tcp == ("tcp://127.0.0.1:5555",)
    assert config.source == str(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[server]\nmax_mesage_bytes = 1\n",
            "unknown key 'server.max_mesage_bytes' (did you mean 'server.max_message_bytes'?)",
        ),
        ("[models.a]\npath = 'a.onnx'\nqueue_depht = 3\n", "unknown key 'models.a.queue_depht'"),
        (
            "[models.a]\npath = 'a.onnx'\nmax_batch = '8'\n",
            "'models.a.max_batch' must be int, got str '8'",
        ),
        (
            "[models.a]\npath = 'a.onnx'\nmax_batch = true\n",
            "'models.a.max_batch' must be int, got bool",
        ),
        ("[models.a]\npath = 'a.onnx'\nmax_batch = 0\n", "'models.a.max_batch' must be >= 1"),
        ("[models.a]\nbackend = 'tflite'\n", "'models.a.backend' must be one of auto, onnx, gguf"),
        (
            "[models.a]\npath = 'a'\n[models.a.onnx]\ngraph_optimization = 'max'\n",
            "must be one of disable, basic, extended, all",
        ),
        ("[daemon]\ndrain_timeout_s = 'soon'\n", "'daemon.drain_timeout_s' must be float"),
        ("[server]\ntcp = 'tcp://x:1'\n", "'server.tcp' must be an array"),
        ("server = 3\n", "'server' must be a table"),
        ("[daemon\n", "not valid TOML"),
    ],
)
def test_invalid_config_names_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert message in str(info.value)


def test_integers_are_accepted_for_float_keys(tmp_path: Path) -> None:
    assert (
        load_config(write(tmp_path, "[daemon]\ndrain_timeout_s = 3\n")).daemon.drain_timeout_s
        == 3.0
    )


def test_lookup_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("EDGED_CONFIG", raising=False)
    local = write(tmp_path, "")
    assert find_config_file("explicit.toml") == Path("explicit.toml")
    assert find_config_file(None) == Path("edged.toml")
    monkeypatch.setenv("EDGED_CONFIG", "/elsewhere.toml")
    assert find_config_file(None) == Path("/elsewhere.toml")
    assert local.exists()


def run_edged(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edged", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_config_check_command(tmp_path: Path) -> None:
    (tmp_path / "a.onnx").write_bytes(b"")
    good = write(tmp_path, "[models.a]\npath = 'a.onnx'\n")
    result = run_edged("config", "check", str(good))
    assert result.returncode == 0 and "ok (1 model(s) declared)" in result.stdout
    good.write_text("[models.a]\npath = 'a.onnx'\nbatch = 2\n")
    result = run_edged("config", "check", str(good))
    assert result.returncode == 78
    assert "unknown key 'models.a.batch'" in result.stderr


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[daemon]\ndrain_timeout_s = nan\n", "must be a finite number"),
        ("[models.'']\npath = 'a.onnx'\n", "model name ''"),
        ("[models.'a b']\npath = 'a.onnx'\n", "model name 'a b'"),
        ("[http]\nlisten = '0.0.0.0:8080'\n", "not a loopback address.*http.public = true"),
        ("[http]\nlisten = 'unix:http.sock'\n", "needs an absolute path"),
    ],
)
def test_values_that_would_misbehave_later_are_refused(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text))


def test_relative_directories_are_relative_to_the_file(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "[daemon]\nstate_dir = 'state'\nruntime_dir = 'run'\n"))
    assert config.daemon.state_dir == str(tmp_path / "state")
    assert config.daemon.runtime_dir == str(tmp_path / "run")


def test_config_check_reports_a_missing_model_file(tmp_path: Path) -> None:
    result = run_edged("config", "check", str(write(tmp_path, "[models.a]\npath = 'a.onnx'\n")))
    assert result.returncode == 78
    assert "'models.a.path': no file at" in result.stderr


def test_clients_find_the_system_service_when_no_daemon_of_their_own_listens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    own, service = tmp_path / "own", tmp_path / "service"
    own.mkdir()
    service.mkdir()
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(own))
    monkeypatch.delenv("EDGED_SOCKET", raising=False)
    monkeypatch.setattr(paths, "SERVICE_RUNTIME_DIR", service)
    assert paths.default_infer_endpoint() == f"ipc://{own / 'infer.sock'}"  # nothing anywhere
    (service / "infer.sock").touch()
    assert paths.default_infer_endpoint() == f"ipc://{service / 'infer.sock'}"
    (own / "infer.sock").touch()  # a daemon of their own wins
    assert paths.default_infer_endpoint() == f"ipc://{own / 'infer.sock'}"


@pytest.mark.parametrize(
    ("provider", "suggestion"),
    [
        ("cudaa", "did you mean 'cuda'?"),
        ("tensort", "did you mean 'tensorrt'?"),
        ("CudaExecutionProvider", "did you mean 'CUDAExecutionProvider'?"),
        ("npu", "known: tensorrt, cuda, openvino, xnnpack, cpu"),
    ],
)
def test_an_unknown_execution_provider_is_refused_with_the_closest_name(
    tmp_path: Path, provider: str, suggestion: str
) -> None:
    text = f"[models.a]\npath = 'a.onnx'\n[models.a.onnx]\nproviders = ['cpu', '{provider}']\n"
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    message = str(info.value)
    assert f"'models.a.onnx.providers[1]': unknown execution provider '{provider}'" in message
    assert suggestion in message


def test_provider_aliases_in_any_case_and_onnxruntime_names_are_accepted(tmp_path: Path) -> None:
    names = "['TensorRT', 'ROCMExecutionProvider', 'DmlExecutionProvider', 'CPU']"
    text = f"[models.a]\npath = 'a.onnx'\n[models.a.onnx]\nproviders = {names}\n"
    providers = load_config(write(tmp_path, text)).models["a"].onnx.providers
    assert providers == ("TensorRT", "ROCMExecutionProvider", "DmlExecutionProvider", "CPU")


def test_gguf_prompt_threads_follow_n_threads_unless_set(tmp_path: Path) -> None:
    text = "[models.a]\npath = 'a.gguf'\n[models.a.gguf]\nn_threads = 2\n"
    assert load_config(write(tmp_path, text)).models["a"].gguf.n_threads_batch == -1
    config = load_config(write(tmp_path, text + "n_threads_batch = 4\n"))
    assert (config.models["a"].gguf.n_threads, config.models["a"].gguf.n_threads_batch) == (2, 4)
    with pytest.raises(ConfigError, match=r"'models\.a\.gguf\.n_threads_batch' must be >= -1"):
        load_config(write(tmp_path, text + "n_threads_batch = -2\n"))
