"""edged under its systemd unit's system-call filter, without systemd (tests/sandbox.py).

systemd/edged.service allows @system-service minus @privileged, fails other calls with EPERM
and leaves MemoryDenyWriteExecute= off for the GPU stacks' JIT code. These tests run the daemon
under that filter plus MemoryDenyWriteExecute=yes, in both of the forms systemd applies it
(PR_SET_MDWE; seccomp rules on older systemd and kernels), and check that the CPU path
(onnxruntime, llama.cpp, ZeroMQ, the control socket, reload and drain) works there, and that the
sandbox really refuses what the unit refuses."""

from __future__ import annotations

import errno
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import tomli_w

from edged.testing import DaemonProcess
from tests import sandbox
from tests.conftest import HAS_GGUF, DaemonFactory, direct_embeddings, llm_config

LAUNCHER = [sys.executable, str(Path(sandbox.__file__).resolve())]
#: how systemd applies MemoryDenyWriteExecute=yes: PR_SET_MDWE (systemd 253+, Linux 6.3+), or
#: seccomp rules (older systemd, such as JetPack's 245 and 249, or older kernels)
MDWE = ["prctl", "seccomp"]
MAX_TOKENS = 16
NO_MDWE = "this kernel has no PR_SET_MDWE (MemoryDenyWriteExecute=, Linux 6.3+)"


def confined(mdwe: str) -> list[str]:
    """The launcher: the unit's filter and MemoryDenyWriteExecute=yes, then the command."""
    return [*LAUNCHER, f"--mdwe={mdwe}", "--"]


#: system calls a confined process should be refused, run in a child: prints errno per probe
PROBE = """
import ctypes, json, os
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t] + [ctypes.c_int] * 3 + [ctypes.c_long]
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
R, W, X, FAILED = 1, 2, 4, ctypes.c_void_p(-1).value
PRIVATE_ANONYMOUS = 0x02 | 0x20

def mmap(prot):
    ctypes.set_errno(0)
    address = libc.mmap(None, 4096, prot, PRIVATE_ANONYMOUS, -1, 0)
    return (None, ctypes.get_errno()) if address == FAILED else (address, 0)

try:
    os.setuid(os.getuid())  # @privileged, yet allowed to anyone for their own uid
    setuid = 0
except OSError as error:
    setuid = error.errno
rw, _ = mmap(R | W)
ctypes.set_errno(0)
gain = 0 if libc.mprotect(rw, 4096, R | X) == 0 else ctypes.get_errno()
status = dict(line.split(":\\t", 1) for line in open("/proc/self/status").read().splitlines())
print(json.dumps({
    "setuid": setuid,
    "write_exec_mmap": mmap(R | W | X)[1],
    "mprotect_exec": gain,
    "seccomp": status["Seccomp"].strip(),
    "no_new_privs": status["NoNewPrivs"].strip(),
}))
"""


def probe(*launcher: str) -> dict[str, Any]:
    """Run PROBE, under ``launcher`` when given; its results."""
    done = subprocess.run(
        [*launcher, sys.executable, "-c", PROBE],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode == sandbox.EXIT_NO_MDWE:
        pytest.skip(NO_MDWE)
    assert done.returncode == 0, done.stdout + done.stderr
    return dict(json.loads(done.stdout))


@pytest.fixture(scope="module", params=MDWE)
def mdwe(request: pytest.FixtureRequest) -> str:
    """Each way of MemoryDenyWriteExecute=yes, skipped where this kernel lacks it."""
    kind = str(request.param)
    done = subprocess.run([*confined(kind), sys.executable, "-c", "pass"], check=False, timeout=60)
    if done.returncode == sandbox.EXIT_NO_MDWE:
        pytest.skip(NO_MDWE)
    assert done.returncode == 0
    return kind


# -- the filter: read from the unit, expanded as systemd expands it ---------------------------

GROUPS = """\
@a
    # the comment line
    one
    @b

@b
    two
    three

@c
    three
"""


def test_groups_expand_recursively_and_later_lines_subtract() -> None:
    groups = sandbox.parse_groups(GROUPS)
    assert groups == {"@a": ["one", "@b"], "@b": ["two", "three"], "@c": ["three"]}
    assert sandbox.expand(["@a"], groups) == {"one", "two", "three"}
    assert sandbox.filter_names(["@a", "~@c"], groups) == (True, {"one", "two"})
    assert sandbox.filter_names(["@a", "~@c", "three"], groups) == (True, {"one", "two", "three"})
    assert sandbox.filter_names(["~@b", "two"], groups) == (False, {"three"})
    assert sandbox.filter_names(["~@b", "", "one"], groups) == (True, {"one"})
    with pytest.raises(sandbox.SandboxError, match="@nope"):
        sandbox.expand(["@nope"], groups)


def test_the_allow_list_is_the_units_filter() -> None:
    filters, error_number = sandbox.unit_settings()
    assert filters and not filters[0].startswith("~")  # an allow-list
    assert error_number == "EPERM"
    groups = sandbox.syscall_groups()
    allowed = set(sandbox.allowed_syscalls())
    denied = {name for value in filters if value.startswith("~") for name in value[1:].split()}
    assert allowed and not allowed & sandbox.expand(denied, groups)
    assert allowed <= sandbox.expand(filters[0].split(), groups)
    # what the unit's comments say the daemon's libraries need: @resources (libzmq's
    # pthread_setschedparam, onnxruntime's thread pinning, OpenBLAS's mbind), and what every
    # process needs
    assert {"sched_setscheduler", "sched_setaffinity", "mbind", "mmap", "execve"} <= allowed
    assert not {"setuid", "chroot", "mount", "reboot", "init_module"} & allowed


# -- the sandbox bites -------------------------------------------------------------------------


def test_outside_the_sandbox_the_probes_succeed() -> None:
    results = probe()  # (a container's own filter, if any, allows these)
    assert (results["setuid"], results["write_exec_mmap"], results["mprotect_exec"]) == (0, 0, 0)


def test_the_filter_refuses_privileged_calls_with_eperm() -> None:
    assert probe(*LAUNCHER, "--") == {
        "setuid": errno.EPERM,
        "write_exec_mmap": 0,  # the filter alone does not stop W+X memory: MDWE does
        "mprotect_exec": 0,
        "seccomp": "2",
        "no_new_privs": "1",
    }


def test_mdwe_refuses_writable_executable_memory(mdwe: str) -> None:
    refused = errno.EACCES if mdwe == "prctl" else errno.EPERM  # the kernel's, or the filter's
    assert probe(*confined(mdwe)) == {
        "setuid": errno.EPERM,
        "write_exec_mmap": refused,
        "mprotect_exec": refused,
        "seccomp": "2",
        "no_new_privs": "1",
    }


def test_the_filter_follows_the_unit_file(tmp_path: Path) -> None:
    text = sandbox.UNIT.read_text()
    assert "\nSystemCallFilter=~@privileged\n" in text and "\nSystemCallErrorNumber=EPERM\n" in text
    other_errno = tmp_path / "errno.service"
    other_errno.write_text(text.replace("SystemCallErrorNumber=EPERM", "SystemCallErrorNumber=EIO"))
    assert probe(*LAUNCHER, "--unit", str(other_errno), "--")["setuid"] == errno.EIO
    no_deny = tmp_path / "allow.service"
    no_deny.write_text(text.replace("\nSystemCallFilter=~@privileged\n", "\n"))
    assert probe(*LAUNCHER, "--unit", str(no_deny), "--")["setuid"] == 0  # in @system-service


# -- the daemon under the unit's filter and MDWE ----------------------------------------------


def sandbox_daemon_config(models_dir: Path, gguf_models: dict[str, Path] | None) -> dict[str, Any]:
    """The ONNX demo model, and the GGUF models where the gguf extra is installed."""
    models: dict[str, Any] = {"demo": {"path": str(models_dir / "demo.onnx"), "preload": True}}
    if gguf_models is not None:
        models["llm"] = llm_config(gguf_models["q8"])
        models["emb"] = llm_config(gguf_models["embed"], gguf={"embedding": True, "n_batch": 64})
    return {"models": models}


@pytest.fixture(scope="module")
def sandboxed(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    models_dir: Path,
    mdwe: str,
) -> Iterator[DaemonProcess]:
    """A daemon with ONNX (and GGUF) models under the filter and MDWE, for the serving tests;
    the GGUF models are asked for only where they can be built, so the ONNX tests still run
    without the gguf extra."""
    gguf_models = request.getfixturevalue("gguf_models") if HAS_GGUF else None
    daemon = DaemonProcess(
        tmp_path_factory.mktemp(f"sandboxed-{mdwe}"),
        sandbox_daemon_config(models_dir, gguf_models),
        wrapper=confined(mdwe),
    )
    try:
        yield daemon.start()
        assert daemon.stop() == 0, daemon.log()
    finally:
        daemon.kill()


def test_an_onnx_model_serves_exactly_what_onnxruntime_computes(
    sandboxed: DaemonProcess, models_dir: Path
) -> None:
    x = np.random.default_rng(3).standard_normal((4, 16), dtype=np.float32)
    with sandboxed.client() as client:
        result = client.infer("demo", {"x": x})
    session = ort.InferenceSession(str(models_dir / "demo.onnx"))
    names = [output.name for output in session.get_outputs()]
    for name, expected in zip(names, session.run(None, {"x": x}), strict=True):
        np.testing.assert_array_equal(result[name], expected)


def test_a_gguf_model_generates_and_embeds(
    sandboxed: DaemonProcess, gguf_models: dict[str, Path]
) -> None:
    import llama_cpp

    with sandboxed.client() as client:
        stream = client.generate("llm", "hello world, the", max_tokens=MAX_TOKENS, temperature=0)
        text = "".join(stream)
        vectors = client.embed("emb", ["hello world", "the cat"])
    assert stream.completion.finish_reason == "length"
    assert stream.completion.completion_tokens == MAX_TOKENS
    llm = llama_cpp.Llama(model_path=str(gguf_models["q8"]), n_ctx=512, n_threads=1, verbose=False)
    try:
        direct: Any = llm.create_completion(
            "hello world, the", max_tokens=MAX_TOKENS, temperature=0
        )
    finally:
        llm.close()
    assert text == direct["choices"][0]["text"]
    assert vectors.shape == (2, 256) and np.all(np.isfinite(vectors))
    assert not np.allclose(vectors[0], vectors[1])
    expected = direct_embeddings(gguf_models["embed"], ["hello world", "the cat"])
    np.testing.assert_allclose(vectors, expected, rtol=1e-4, atol=1e-5)


def test_the_control_socket_answers_and_nothing_failed(sandboxed: DaemonProcess) -> None:
    with sandboxed.control() as control:
        status = control.command("status")
        sysinfo = control.command("sysinfo")["sysinfo"]
    assert status["pid"] == sandboxed.pid  # the launcher exec'd the daemon: signals reach it
    proc_status = Path(f"/proc/{sandboxed.pid}/status").read_text()
    assert "\nSeccomp:\t2\n" in proc_status and "\nNoNewPrivs:\t1\n" in proc_status
    assert status["state"] == "serving"
    served = ("demo", "llm", "emb") if HAS_GGUF else ("demo",)  # GGUF models with the extra
    assert {name: model["state"] for name, model in status["models"].items()} == dict.fromkeys(
        served, "ready"
    )
    assert status["errors"] == 0 and status["last_errors"] == [], status
    assert sysinfo
    assert "Operation not permitted" not in sandboxed.log(), sandboxed.log()


def test_sighup_reloads_and_sigterm_drains_to_exit_zero_under_the_filter(
    start_daemon: DaemonFactory,
    models_dir: Path,
    gguf_models: dict[str, Path],
    mdwe: str,
) -> None:
    config = {"models": {"llm": llm_config(gguf_models["q8"])}}
    daemon = start_daemon(config, wrapper=confined(mdwe))
    demo = {"path": str(models_dir / "demo.onnx"), "preload": True}
    daemon.config_path.write_text(
        tomli_w.dumps({**daemon.config, "models": {**config["models"], "demo": demo}})
    )
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 60
    with daemon.client() as client:
        while "demo" not in client.ping()["models"]:
            assert time.monotonic() < deadline, daemon.log()
            time.sleep(0.05)
        probs = client.infer("demo", {"x": np.zeros((1, 16), np.float32)})["probs"]
        stream = client.generate("llm", "the cat", max_tokens=4, temperature=0)
        assert len(list(stream)) >= 1 and stream.completion.completion_tokens == 4
    assert probs.shape == (1, 4)
    assert daemon.stop() == 0, daemon.log()
    assert "reload refused" not in daemon.log()
