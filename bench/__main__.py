"""`make bench`: the CPU benchmark set, printed as one table.

Each benchmark is its own script (run any of them alone for details and options); here each
runs in its own process, writes its rows as JSON, and the rows are gathered into one table with
every figure beside its baseline from the same run and its target. The GPU benchmark of the
full-size recipe is bench/gpu_bench.py (run on a GPU machine).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.rows import table

HERE = Path(__file__).resolve().parent
# (script, arguments): the tiny-twin trainer, full-size loading, resize and chop, the daemon (local
# and on Ray), the TUI, the captioners, the full-size chain.
SET = [
    ("train_bench.py", []),
    ("load_bench.py", []),
    ("resize_bench.py", ["--runs", "2"]),
    ("daemon_bench.py", []),
    ("ray_bench.py", []),  # a Ray actor against a local worker; the copy path's MB/s
    ("tui_bench.py", []),
    ("caption_bench.py", []),
    (
        "fullsize_bench.py",
        [],
    ),  # the full-size chain on this CPU: train one update, resize, chop, load in diffusers
]


def main() -> int:
    rows, failed = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for script, extra in SET:
            out = Path(tmp) / f"{script}.json"
            start = time.perf_counter()
            print(f"== {script} {' '.join(extra)}", flush=True)
            r = subprocess.run([sys.executable, str(HERE / script), *extra, "--json", str(out)])
            print(f"   ({time.perf_counter() - start:.0f} s)", flush=True)
            if r.returncode != 0 or not out.exists():
                failed.append(script)
                continue
            rows += json.loads(out.read_text())
    print()
    print(table(rows))
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
