"""edgectl as an operator meets it: a daemon that dies mid-install, relative paths, a closed
pipe, key files of the wrong kind."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from edged.control.ops import CONTROL_OPS
from edged.edgectl import main as edgectl_main
from edged.faults import ENV
from edged.testing import DaemonProcess
from tests.bundles import WIDTH, make, serving, signing_keys
from tests.conftest import EDGECTL, DaemonFactory, store_versions
from tests.models import build_wide_model

#: an address nothing listens on: the commands below must fail before they connect
NOWHERE = "tcp://127.0.0.1:9"


def ota_daemon(
    start_daemon: DaemonFactory, tmp_path: Path, env: dict[str, str] | None = None
) -> tuple[DaemonProcess, Path]:
    """A daemon serving "m" version 1 that trusts the key a version 2 bundle is signed with;
    the daemon and the bundle."""
    keys = signing_keys(tmp_path)
    store_versions(tmp_path / "d", "m", [build_wide_model(tmp_path / "v1.onnx", WIDTH, 1)])
    ota = {"trusted_keys": str(keys["trusted"]), "health_window_s": 0.3}
    config = {"ota": ota, "models": {"m": {"preload": True}}}
    daemon = start_daemon(config, workdir=tmp_path / "d", env=env)
    return daemon, make(tmp_path, keys, 2)


def wait_for_log(daemon: DaemonProcess, text: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while text not in daemon.log():
        assert time.monotonic() < deadline, daemon.log()
        time.sleep(0.05)


def run(*args: str, **options: Any) -> subprocess.CompletedProcess[str]:
    command = [*EDGECTL, *args]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=60, check=False, **options
    )


def test_install_gives_up_when_the_daemon_dies_during_it(
    start_daemon: DaemonFactory, tmp_path: Path
) -> None:
    daemon, bundle = ota_daemon(start_daemon, tmp_path, env={ENV: "ota.verifying:hang"})
    command = [*EDGECTL, "--control", daemon.control_endpoint, "--timeout", "2"]
    edgectl = subprocess.Popen(
        [*command, "install", str(bundle)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_log(daemon, "hang at ota.verifying")  # the install is under way
        daemon.kill()
        _, stderr = edgectl.communicate(timeout=60)  # a bound on a hang: it would wait 300 s
    finally:
        edgectl.kill()
        edgectl.wait()
    assert edgectl.returncode == 1
    [line] = stderr.splitlines()
    assert line.startswith("edgectl: NO_DAEMON: the daemon stopped answering while this client ")
    assert f"no daemon at {daemon.runtime_dir / 'control.sock'}" in line


def test_a_relative_bundle_path_is_edgectls(start_daemon: DaemonFactory, tmp_path: Path) -> None:
    daemon, bundle = ota_daemon(start_daemon, tmp_path)
    here = bundle.parent / "here"
    here.mkdir()
    relative = Path("..") / bundle.name
    done = run("--control", daemon.control_endpoint, "--json", "install", str(relative), cwd=here)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["outcome"] == "installed"
    assert serving(daemon) == 2


@pytest.mark.parametrize(
    "command", [["install", "m.bundle"], ["swap", "m", "--path", "models/m.onnx"]]
)
def test_a_relative_path_for_a_remote_daemon_is_refused(command: list[str]) -> None:
    """The file is on the device, whose working directory edgectl cannot know."""
    done = run("--control", NOWHERE, "--timeout", "1", *command)
    assert done.returncode == 2
    assert "a path on a remote device must be absolute" in done.stderr.splitlines()[-1]


def closed_pipe(command: list[str]) -> subprocess.CompletedProcess[str]:
    """Run ``command`` with its stdout a pipe whose reader is gone (``| head`` once it has
    read enough)."""
    reader, writer = os.pipe()
    os.close(reader)
    try:
        return subprocess.run(
            command, stdout=writer, stderr=subprocess.PIPE, text=True, timeout=60, check=False
        )
    finally:
        os.close(writer)


def test_a_closed_pipe_ends_edgectl_quietly(demo_daemon: DaemonProcess) -> None:
    done = closed_pipe([*EDGECTL, "--control", demo_daemon.control_endpoint, "sysinfo"])
    assert done.stderr == ""
    assert done.returncode == 1


def test_keys_curve_makes_a_curve_pair_and_gen_is_its_deprecated_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert edgectl_main(["keys", "curve", "new", "--dir", str(tmp_path), "--json"]) == 0
    made = json.loads(capsys.readouterr().out)
    assert made == {"public": str(tmp_path / "new.key"), "secret": str(tmp_path / "new.key_secret")}
    assert "curve" in (tmp_path / "new.key").read_text()  # a ZeroMQ certificate
    assert edgectl_main(["keys", "gen", "old", "--dir", str(tmp_path), "--json"]) == 0
    assert (tmp_path / "old.key_secret").is_file()
    assert "'keys gen' is deprecated, say 'keys curve'" in capsys.readouterr().err


def test_a_public_key_as_client_key_is_a_usage_error(tmp_path: Path) -> None:
    for name in ("server", "client"):
        assert edgectl_main(["keys", "curve", name, "--dir", str(tmp_path), "--json"]) == 0
    keys = ["--server-key", str(tmp_path / "server.key")]
    done = run("--remote", NOWHERE, *keys, "--client-key", str(tmp_path / "client.key"), "status")
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1] == (
        f"edgectl: error: {tmp_path / 'client.key'} is a public key: the client's key is its "
        "secret one, NAME.key_secret (NAME.key is the public half that the daemon authorizes)"
    )


def test_every_command_comes_from_the_control_registry(capsys: pytest.CaptureFixture[str]) -> None:
    """edgectl offers each control op that has help, with the op's own arguments, and no
    command that is not an op (besides the local push, textfile and keys)."""
    with pytest.raises(SystemExit):
        edgectl_main(["--help"])
    listed = capsys.readouterr().out.split("{", 1)[1].split("}", 1)[0].split(",")
    commands = [name for name, op in CONTROL_OPS.items() if op.help]
    assert listed == [*commands, "push", "textfile", "keys"]
    for name in commands:
        with pytest.raises(SystemExit):
            edgectl_main([name, "--help"])
        usage = capsys.readouterr().out
        for argument in CONTROL_OPS[name].args:
            assert any(flag in usage for flag in argument.flags), (name, argument, usage)


def test_describe_shows_a_loaded_models_interface(demo_daemon: DaemonProcess) -> None:
    control = ["--control", demo_daemon.control_endpoint]
    unloaded = run(*control, "describe", "demo")
    assert unloaded.returncode == 1 and "(loaded: none); 'edgectl load demo'" in unloaded.stderr
    assert run(*control, "load", "demo").returncode == 0
    described = json.loads(run(*control, "--json", "describe", "demo").stdout)
    assert described["model"] == "demo" and described["version"] >= 1
    assert [spec["name"] for spec in described["signature"]["inputs"]] == ["x"]
    text = run(*control, "describe", "demo").stdout
    assert "  in  x: float32[" in text and "  out probs: float32[" in text
    missing = run(*control, "describe", "demo", "99")
    assert missing.returncode == 1
    assert "has no version 99 loaded" in missing.stderr
