"""Loading a full-size SDXL checkpoint: peak RSS against the file's size (target: at most 1.3×).

    python bench/load_bench.py [--tiny] [--runs 2] [--json OUT]

A random single-file SDXL (UNet, VAE, both text encoders, fp16, the real key set: ~6.9 GB) is
written at run time, one tensor at a time, into a temporary folder and removed afterwards. Each
measurement runs in a child process (the two kinds alternating, --runs of each; the best wall
time and the highest peak are reported), whose own peak RSS is read from wait4:
  ours      engine.models.sdxl.load_sdxl, streaming tensors into meta-built modules (fp16);
  baseline  safetensors.torch.load_file, every tensor copied into memory (what a state-dict load
            holds before it fills any module), no modules at all.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.rows import PEAK_RSS_SNIPPET, row, table, write_rows  # noqa: E402
from loradrop.engine.tensorfile import write_streaming  # noqa: E402

_OURS = """
import sys, torch
from loradrop.engine.models.sdxl import load_sdxl
model = load_sdxl(sys.argv[1], dtype=torch.float16, vae_dtype=torch.float16)
"""
_BASELINE = """
import sys
from safetensors.torch import load_file
tensors = {k: v.clone() for k, v in load_file(sys.argv[1]).items()}
"""


def build_checkpoint(path: Path, tiny: bool = False) -> None:
    """A random full-size SDXL single file at `path` (or the tiny twin, with `tiny`)."""
    if tiny:
        from loradrop.engine.models.tiny import make_tiny

        make_tiny(path)
        return
    from loradrop.engine.models.configs import sdxl_config
    from loradrop.engine.models.sdxl import build_empty, component_map

    config = sdxl_config()
    shapes: dict[str, tuple[int, ...]] = {}
    for name, module in build_empty(config).items():
        state = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        for entry in component_map(name, config, module).entries:
            parts = [state[d] for d in entry.diffusers]
            if entry.op == "qkv":
                shapes[entry.sgm] = (sum(p[0] for p in parts), *parts[0][1:])
            elif entry.op == "transpose":
                shapes[entry.sgm] = parts[0][::-1]
            elif entry.op == "conv1x1":
                shapes[entry.sgm] = (*parts[0], 1, 1)
            else:
                shapes[entry.sgm] = parts[0]
    g = torch.Generator().manual_seed(0)
    specs = {k: (torch.float16, s) for k, s in shapes.items()}
    write_streaming(path, specs, lambda key: (torch.randn(shapes[key], generator=g) * 0.02).to(torch.float16))


def measure(code: str, path: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS bytes) of one child process."""
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", code + PEAK_RSS_SNIPPET, str(path)], capture_output=True, text=True
    )
    if out.returncode != 0:
        raise SystemExit(f"a measuring child failed: {out.stderr}")
    return time.perf_counter() - start, float(out.stdout.split()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--tiny", action="store_true", help="the tiny twin instead (seconds; keeps the bench from rotting)"
    )
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--runs", type=int, default=2, help="loads of each kind, alternating (default 2)")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="loradrop-load-bench-"))
    try:
        path = root / "sdxl.safetensors"
        build_checkpoint(path, args.tiny)
        size = path.stat().st_size
        # Alternate the two, so neither gains from the other warming the page cache (the file
        # was just written): the best wall time of each, the highest peak.
        runs = {"ours": [], "base": []}
        for _ in range(args.runs):
            runs["ours"].append(measure(_OURS, path))
            runs["base"].append(measure(_BASELINE, path))
        ours_s, ours_rss = min(s for s, _ in runs["ours"]), max(r for _, r in runs["ours"])
        base_s, base_rss = min(s for s, _ in runs["base"]), max(r for _, r in runs["base"])
        print(
            "wall times: ours "
            + ", ".join(f"{s:.1f}" for s, _ in runs["ours"])
            + " s; load_file "
            + ", ".join(f"{s:.1f}" for s, _ in runs["base"])
            + " s"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    what = "tiny twin" if args.tiny else "full SDXL"
    rows = [
        row(
            f"load {what} ({size / 1e9:.2f} GB): peak RSS",
            ours_rss / 1e9,
            "GB",
            f"≤ 1.3× file (is {ours_rss / size:.2f}×)",
            base_rss / 1e9,
            "load_file + copies",
        ),
        row(f"load {what}: wall time", ours_s, "s", "-", base_s, "load_file + copies"),
    ]
    print(table(rows))
    write_rows(rows, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
