"""A sensor process for swap tests: infers in a loop until told to stop, checking every reply
against the outputs of the version the reply names; prints its tally as JSON.

    python -m tests.swap_load ENDPOINT MODEL EXPECTED.npz STOP_FILE
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from edged.client import Client
from edged.errors import EdgedError


def main(endpoint: str, model: str, expected_file: str, stop_file: str) -> None:
    with np.load(expected_file) as data:
        inputs = {"x": data["x"]}
        expected = {int(key.removeprefix("v")): data[key] for key in data.files if key != "x"}
    tally = {"requests": 0, "failures": 0, "mismatches": 0, "versions": [], "errors": []}
    seen: set[int] = set()
    stop = Path(stop_file)
    with Client(endpoint, timeout=30) as client:
        while not stop.exists():
            tally["requests"] += 1
            try:
                result = client.infer(model, inputs)
            except EdgedError as exc:
                tally["failures"] += 1
                tally["errors"].append(f"{exc.code}: {exc}"[:200])
                continue
            if not seen:
                print("ready", flush=True)  # the test swaps only once every client is serving
            seen.add(result.version)
            want = expected.get(result.version)
            if want is None or not np.allclose(result["y"], want, atol=1e-5):
                tally["mismatches"] += 1
    tally["versions"] = sorted(seen)
    print(json.dumps(tally))


if __name__ == "__main__":
    main(*sys.argv[1:5])
