"""``python -m bench [--only NAME,...] [--quick]``: run, write bench/results.json, print a table."""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from types import FrameType

from bench.harness import FULL, QUICK, Row, Settings, format_table, write_results
from bench.suite import BENCHMARKS, Context

RESULTS_PATH = Path(__file__).resolve().parent / "results.json"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "--only",
        type=lambda value: [name.strip() for name in value.split(",") if name.strip()],
        default=list(BENCHMARKS),
        help=f"comma-separated benchmarks to run (default: all of {', '.join(BENCHMARKS)})",
    )
    parser.add_argument("--quick", action="store_true", help="short windows, for iterating")
    args = parser.parse_args(argv)
    unknown = [name for name in args.only if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    return args


def run(names: Sequence[str], settings: Settings) -> list[Row]:
    """Run in a fresh directory; every helper process is stopped before it is removed."""
    # /tmp, not $TMPDIR: that can be too long for a Unix socket path (107 bytes)
    workdir = Path(tempfile.mkdtemp(prefix="edged-bench-", dir="/tmp"))
    try:
        with ExitStack() as stack:
            context = Context(settings, workdir, stack)
            rows: list[Row] = []
            for name in names:
                print(f"running {name} ...", file=sys.stderr, flush=True)
                rows += BENCHMARKS[name](context)
            return rows
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    """SIGTERM unwinds like Ctrl-C, so the helper processes are stopped rather than orphaned."""
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    rows = run(args.only, QUICK if args.quick else FULL)
    write_results(rows, RESULTS_PATH)
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
