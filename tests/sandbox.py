"""Run a command under edged.service's system-call filter, without systemd.

    python -m tests.sandbox [--mdwe[=prctl|seccomp]] [--unit PATH] -- CMD ARGS...
    python -m tests.sandbox --list          # the allowed system calls, one a line

systemd/edged.service confines the daemon with SystemCallFilter=, SystemCallErrorNumber=,
SystemCallArchitectures=native and NoNewPrivileges=yes. The unit can only be started where
systemd runs as PID 1, so this launcher applies the same filter to itself and then execs the
command: seccomp filters, no_new_privs and MDWE are inherited across execve and fork. That lets
tests run a real daemon, ONNX and GGUF models and all, under the unit's own filter.

- The filter comes from the unit's SystemCallFilter= lines, in order (the first sets allow- or
  deny-list mode, a later ``~`` line removes from an allow-list), with its ``@groups`` expanded
  by ``systemd-analyze syscall-filter``: the check follows the unit when the unit changes.
- Names libseccomp does not know on this architecture are skipped, as systemd skips them. The
  filter covers the native architecture only; any call it does not allow fails with the unit's
  SystemCallErrorNumber=.
- ``--mdwe`` adds what MemoryDenyWriteExecute=yes does with systemd 253 and later on Linux 6.3
  and later: ``prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN)``, no mapping both writable and
  executable and no mapping made executable later. A kernel without it exits with
  ``EXIT_NO_MDWE``. ``--mdwe=seccomp`` adds what older systemd (the 245 and 249 of JetPack 5
  and 6) or older kernels do instead: a second filter that fails with EPERM mmap() with
  PROT_WRITE|PROT_EXEC, mprotect() and pkey_mprotect() with PROT_EXEC, shmat() with SHM_EXEC.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pyseccomp

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "edged.service"

#: the launcher's own failures (a unit it cannot read, no systemd-analyze, no libseccomp)
EXIT_SETUP = 125
#: --mdwe on a kernel without PR_SET_MDWE (before Linux 6.3): tests skip on it
EXIT_NO_MDWE = 90

PR_SET_NO_NEW_PRIVS = 38
PR_SET_MDWE = 65
PR_GET_MDWE = 66
PR_MDWE_REFUSE_EXEC_GAIN = 1
PROT_WRITE, PROT_EXEC = 0x2, 0x4
SHM_EXEC = 0o100000


class SandboxError(RuntimeError):
    """The filter cannot be built as the unit describes it."""


def unit_settings(unit: Path = UNIT) -> tuple[list[str], str]:
    """The ``[Service]`` section's SystemCallFilter= values, in order, and the last
    SystemCallErrorNumber= ("" when unset)."""
    filters: list[str] = []
    error_number = ""
    section = ""
    for raw in unit.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        if section != "Service":
            continue
        if key.strip() == "SystemCallFilter":
            filters.append(value.strip())
        elif key.strip() == "SystemCallErrorNumber":
            error_number = value.strip()
    return filters, error_number


def parse_groups(text: str) -> dict[str, list[str]]:
    """``systemd-analyze syscall-filter``'s output: each ``@group`` and its members (system
    calls and other groups), comments left out."""
    groups: dict[str, list[str]] = {}
    members: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("@"):
            members = groups.setdefault(line.strip(), [])
        elif not line.strip():
            members = None
        elif members is not None and not line.strip().startswith("#"):
            members.append(line.split("#", 1)[0].strip())
    return groups


def syscall_groups() -> dict[str, list[str]]:
    """Every group this systemd knows, from ``systemd-analyze syscall-filter``."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        raise SandboxError("systemd-analyze is not installed")
    done = subprocess.run(
        [analyze, "syscall-filter", "--no-pager"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    groups = parse_groups(done.stdout)
    if done.returncode != 0 or "@system-service" not in groups:
        raise SandboxError(f"systemd-analyze syscall-filter failed: {done.stderr.strip()}")
    return groups


def expand(names: Iterable[str], groups: dict[str, list[str]]) -> set[str]:
    """System call names, with every ``@group`` replaced by its members, recursively."""
    found: set[str] = set()
    seen: set[str] = set()
    pending = list(names)
    while pending:
        name = pending.pop()
        if not name.startswith("@"):
            found.add(name)
        elif name not in seen:
            if name not in groups:
                raise SandboxError(f"systemd-analyze knows no system call group {name}")
            seen.add(name)
            pending.extend(groups[name])
    return found


def filter_names(filters: Sequence[str], groups: dict[str, list[str]]) -> tuple[bool, set[str]]:
    """SystemCallFilter= assignments as systemd combines them: (allow-list mode, the names).

    The first assignment sets the mode: an allow-list, or with ``~`` a deny-list. Later
    assignments of the same kind add names, of the other kind take them away; an empty one
    resets."""
    allow: bool | None = None
    names: set[str] = set()
    for value in filters:
        if not value:
            allow, names = None, set()
            continue
        negated = value.startswith("~")
        items = value.removeprefix("~").split()
        if any(":" in item for item in items):
            raise SandboxError(f"per-call error numbers are not supported: {value}")
        if allow is None:
            allow = not negated
        if negated == (not allow):
            names |= expand(items, groups)
        else:
            names -= expand(items, groups)
    return bool(allow), names


def errno_action(value: str) -> int:
    """SystemCallErrorNumber= as a libseccomp action: ERRNO(n), or kill when unset."""
    import pyseccomp

    if not value or value == "kill":
        return pyseccomp.KILL_PROCESS
    if value == "log":
        return pyseccomp.LOG
    number = int(value) if value.isdigit() else getattr(errno, value, None)
    if not isinstance(number, int):
        raise SandboxError(f"unknown SystemCallErrorNumber={value}")
    return pyseccomp.ERRNO(number)


def resolved(names: Iterable[str]) -> dict[str, int]:
    """The names libseccomp knows on this architecture, with their numbers; others are
    skipped (a negative number is a call this architecture does not have)."""
    import pyseccomp

    numbers = {name: pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name) for name in names}
    return {name: number for name, number in sorted(numbers.items()) if number >= 0}


def allowed_syscalls(unit: Path = UNIT) -> list[str]:
    """The system calls the unit's filter allows on this machine (an allow-list unit)."""
    filters, _ = unit_settings(unit)
    allow, names = filter_names(filters, syscall_groups())
    if not allow:
        raise SandboxError(f"{unit} has no allow-list SystemCallFilter=")
    return list(resolved(names))


def _prctl(option: int, arg: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, *[ctypes.c_ulong] * 4]
    libc.prctl.restype = ctypes.c_int
    if libc.prctl(option, arg, 0, 0, 0) == 0:
        return 0
    return ctypes.get_errno()


def mdwe_filter() -> pyseccomp.SyscallFilter:
    """systemd's MemoryDenyWriteExecute= as a seccomp filter (what it loads where it cannot use
    PR_SET_MDWE): writable and executable mappings, and making memory executable, fail with
    EPERM; everything else is left to the other filter."""
    import pyseccomp
    from pyseccomp import MASKED_EQ, Arg

    seccomp = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
    refuse = pyseccomp.ERRNO(errno.EPERM)
    write_exec = PROT_WRITE | PROT_EXEC
    rules = {
        "mmap": Arg(2, MASKED_EQ, write_exec, write_exec),
        "mprotect": Arg(2, MASKED_EQ, PROT_EXEC, PROT_EXEC),
        "pkey_mprotect": Arg(2, MASKED_EQ, PROT_EXEC, PROT_EXEC),
        "shmat": Arg(2, MASKED_EQ, SHM_EXEC, SHM_EXEC),
    }
    for name, number in resolved(rules).items():
        seccomp.add_rule(refuse, number, rules[name])
    return seccomp


def confine(unit: Path = UNIT, mdwe: str | None = None) -> None:
    """Apply the unit's filter (and MDWE: "prctl" or "seccomp") to this process, for good."""
    import pyseccomp

    filters, error_number = unit_settings(unit)
    if not filters:
        raise SandboxError(f"{unit} sets no SystemCallFilter=")
    allow, names = filter_names(filters, syscall_groups())
    denied = errno_action(error_number)
    seccomp = pyseccomp.SyscallFilter(denied if allow else pyseccomp.ALLOW)
    for number in resolved(names).values():  # the context holds the native architecture only
        seccomp.add_rule(pyseccomp.ALLOW if allow else denied, number)
    failed = _prctl(PR_SET_NO_NEW_PRIVS, 1)  # NoNewPrivileges=yes; needed without CAP_SYS_ADMIN
    if failed:
        raise SandboxError(f"PR_SET_NO_NEW_PRIVS: {os.strerror(failed)}")
    if mdwe == "prctl":
        failed = _prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN)
        if failed == errno.EINVAL:
            print("sandbox: this kernel has no PR_SET_MDWE (Linux 6.3+)", file=sys.stderr)
            raise SystemExit(EXIT_NO_MDWE)
        if failed:
            raise SandboxError(f"PR_SET_MDWE: {os.strerror(failed)}")
    elif mdwe == "seccomp":
        mdwe_filter().load()
    seccomp.load()


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    split = args.index("--") if "--" in args else len(args)
    parser = argparse.ArgumentParser(
        prog="python -m tests.sandbox",
        description="Run CMD under edged.service's SystemCallFilter= (and MDWE with --mdwe).",
        usage="%(prog)s [--mdwe[=prctl|seccomp]] [--unit PATH] -- CMD [ARGS...] | %(prog)s --list",
    )
    parser.add_argument(
        "--mdwe",
        nargs="?",
        const="prctl",
        choices=["prctl", "seccomp"],
        help="MemoryDenyWriteExecute=yes too: PR_SET_MDWE (the default) or seccomp rules",
    )
    parser.add_argument("--unit", type=Path, default=UNIT, help="the unit file (edged's)")
    parser.add_argument("--list", action="store_true", help="print the allowed calls and exit")
    options = parser.parse_args(args[:split])
    command = args[split + 1 :]
    try:
        if options.list:
            print("\n".join(allowed_syscalls(options.unit)))
            return 0
        if not command:
            parser.error("no command after --")
        confine(options.unit, options.mdwe)
    except (SandboxError, ImportError, OSError, subprocess.SubprocessError) as error:
        print(f"sandbox: {error}", file=sys.stderr)
        return EXIT_SETUP
    try:
        os.execvp(command[0], command)
    except FileNotFoundError:
        print(f"sandbox: {command[0]}: not found", file=sys.stderr)
        return 127
    except OSError as error:
        print(f"sandbox: {command[0]}: {error.strerror}", file=sys.stderr)
        return 126


if __name__ == "__main__":
    raise SystemExit(main())
