"""``python -m bench.bare MODEL``: the idle-RSS baseline, a process holding only what serving needs.

It imports the libraries the daemon is built on, loads the same session and prints its RSS in
bytes, so the daemon's RSS minus this is what edged itself costs in memory.
"""

from __future__ import annotations

import importlib
import sys

import psutil

from bench.session import open_session

LIBRARIES = ("numpy", "zmq", "msgpack", "onnxruntime")


def rss_with_session(model_path: str) -> int:
    """RSS in bytes with the libraries imported and the session loaded (and still alive)."""
    for name in LIBRARIES:
        importlib.import_module(name)
    _session = open_session(model_path)  # held until the RSS is read
    return psutil.Process().memory_info().rss


if __name__ == "__main__":
    print(rss_with_session(sys.argv[1]))
