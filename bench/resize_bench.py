"""Resize and chop a full-size SDXL LoCon (against a full-size base): wall time and peak RSS.

    python bench/resize_bench.py            # full size: a ~6 GB base and a ~117 M-parameter LoCon
    python bench/resize_bench.py --tiny     # the same on the tiny twin (seconds; keeps it from rotting)

Both files are random and built at run time in a temporary folder (never committed): the base is
SDXL's whole UNet plus both text encoders' MLPs in fp16, written one tensor at a time; the LoCon
has the seed recipe's module set (lycoris-lora's, on the same model: 788 UNet modules, 88 text
encoder MLPs; rank 8 alpha 4, 3x3 convs rank 256 alpha 4). Its singular values spread over two
decades around the recipe's threshold, so about half the dimensions are kept.

The resize runs in a child process, the one whose peak RSS is reported (the child reads its own
VmHWM). resize_lora's figures on the same kind of files, measured on this kind of
machine (reference/checked-here.md), are printed beside ours.

The chop (the guide's kind of vector: a few blocks kept, one of them at 0.5) runs the same way,
beside a child doing what chop_blocks does with the safetensors library: load the file, keep
the blocks' keys, save them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.rows import row, write_rows  # noqa: E402
from loradrop.engine.tensorfile import write_streaming  # noqa: E402

REFERENCE = {"wall_s": 4.7, "peak_rss_gb": 7.0}  # resize_lora -r fro_ckpt=1,thr=-3.55, full size
RECIPE = "fro_ckpt=1,thr=-3.55"
_TE_MLP = ("mlp.fc1.", "mlp.fc2.", "mlp.c_fc.", "mlp.c_proj.")


def _random(shape, generator: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
    return (torch.randn(shape, generator=generator) * (scale / math.sqrt(fan_in))).to(torch.float16)


def build_base(path: Path, tiny: bool) -> None:
    if tiny:
        from loradrop.engine.models.tiny import make_tiny

        make_tiny(path)
        return
    from loradrop.engine.models.configs import sdxl_config
    from loradrop.engine.models.sdxl import build_empty, component_map

    config = sdxl_config()
    shapes: dict[str, tuple[int, ...]] = {}
    for name, module in build_empty(config, ("unet", "te1", "te2")).items():
        cmap = component_map(name, config, module)
        state = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        for entry in cmap.entries:
            if name != "unet" and not any(m in entry.sgm for m in _TE_MLP):
                continue
            parts = [state[d] for d in entry.diffusers]
            shape = parts[0] if entry.op == "copy" else (sum(p[0] for p in parts), *parts[0][1:])
            shapes[entry.sgm] = shape
    g = torch.Generator().manual_seed(0)
    specs = {k: (torch.float16, s) for k, s in shapes.items()}
    write_streaming(path, specs, lambda key: _random(shapes[key], g) if len(shapes[key]) > 1 else torch.zeros(shapes[key], dtype=torch.float16))


def seed_modules(tiny: bool) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], float]]:
    """kohya name → (down shape, up shape, alpha) of the seed recipe's LoCon, from lycoris-lora."""
    import logging

    from lycoris import LycorisNetwork, create_lycoris

    from loradrop.engine.models import keymap
    from loradrop.engine.models.configs import sdxl_config, tiny_config
    from loradrop.engine.models.sdxl import build_empty

    logging.getLogger("LyCORIS").setLevel(logging.WARNING)  # it logs every build at INFO
    config = tiny_config() if tiny else sdxl_config()
    models = build_empty(config, ("unet", "te1", "te2"))
    names = keymap.UNetNames(config.unet)
    out = {}
    for component, targets, conv in (("unet", ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"], 256), ("te1", ["CLIPMLP"], 0), ("te2", ["CLIPMLP"], 0)):
        root = models[component]
        LycorisNetwork.apply_preset({"target_module": targets, "target_name": []})
        kwargs = {"conv_dim": conv, "conv_alpha": 4} if conv else {}
        net = create_lycoris(root, 1.0, linear_dim=8, linear_alpha=4, algo="locon", **kwargs)
        paths = {id(m): p for p, m in root.named_modules()}
        for lora in net.loras:
            path = paths[id(lora.org_module[0])]
            name = keymap.lora_name(component, path, names if component == "unet" else None)
            out[name] = (tuple(lora.lora_down.weight.shape), tuple(lora.lora_up.weight.shape), float(lora.alpha))
    return out


def build_lora(path: Path, tiny: bool) -> int:
    from loradrop.engine.lora.lorafile import save_lora

    g = torch.Generator().manual_seed(1)
    tensors = {}
    for name, (down, up, alpha) in seed_modules(tiny).items():
        rank = down[0]
        # Columns of up spread over two decades, so singular values straddle the threshold.
        spread = torch.logspace(-1, 1, rank)[torch.randperm(rank, generator=g)]
        tensors[name + ".lora_down.weight"] = _random(down, g)
        tensors[name + ".lora_up.weight"] = (torch.randn(up, generator=g) * 3e-3 * spread.reshape(1, rank, *([1] * (len(up) - 2)))).half()
        tensors[name + ".alpha"] = torch.tensor(alpha, dtype=torch.float16)
    save_lora(path, tensors, {"ss_network_dim": "8", "ss_network_alpha": "4.0"})
    return sum(t.numel() for t in tensors.values())


_CHILD = """
import json, sys, time
t0 = time.perf_counter()
from loradrop.engine.lora.resize import resize
t1 = time.perf_counter()
report = resize(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], "fp16", "cpu")
t2 = time.perf_counter()
kept = sum(r[1] for r in report.ranks.values())
peak = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
print(json.dumps({"import_s": t1 - t0, "resize_s": t2 - t1, "path": str(report.path), "kept_dims": kept, "params_out": report.params_out, "peak": peak}))
"""


_CHOP = """
import json, sys, time
t0 = time.perf_counter()
from loradrop.engine.lora.chop import chop
result = chop(sys.argv[1], sys.argv[2], sys.argv[3])
peak = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
print(json.dumps({"import_s": 0.0, "resize_s": time.perf_counter() - t0, "peak": peak}))
"""
_CHOP_BASELINE = """
import json, sys, time
t0 = time.perf_counter()
from safetensors.torch import load_file, save_file
from loradrop.engine.lora.blocks import layout, parse_vector
tensors = load_file(sys.argv[1])
lay = layout(tensors)
weights = parse_vector(sys.argv[2], len(lay.blocks))
keep = set(lay.passthrough) | {k for block, w in zip(lay.blocks, weights[1:]) if w for k in block.keys}
save_file({k: tensors[k] for k in keep}, sys.argv[3])
peak = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
print(json.dumps({"import_s": 0.0, "resize_s": time.perf_counter() - t0, "peak": peak}))
"""
VECTOR = "1,0,0,0,0,0,0,0,1,0.5,0,0,0,1,1,1,0,0,0,0,0"  # IN07, IN08 at half, MID, OUT00, OUT01


def measure(base: Path, lora: Path, out: Path, code: str = _CHILD, args: tuple[str, ...] | None = None) -> dict:
    """Run one resize (or `code` with `args`) in a child; its wall time (start to exit) and its
    own peak RSS (VmHWM, read by the child: wait4's ru_maxrss would include this process's
    high-water mark)."""
    args = args if args is not None else (str(base), str(lora), RECIPE, str(out))
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE)
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if child.returncode != 0:
        raise SystemExit(f"the resize child failed with exit code {child.returncode}")
    result = json.loads(output)
    result.update(wall_s=wall, cpu_s=usage.ru_utime + usage.ru_stime, peak_rss_gb=result["peak"] / 1e9)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="run on the tiny twin (seconds)")
    parser.add_argument("--runs", type=int, default=2, help="resize runs (the first may read the base from disk)")
    parser.add_argument("--json", type=Path, help="also write the result rows as JSON here")
    parser.add_argument("--workdir", type=Path, help="keep the built files here and reuse them (default: a temporary folder, removed)")
    args = parser.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="loradrop-resize-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    base, lora = work / "base.safetensors", work / "locon.safetensors"
    try:
        t = time.perf_counter()
        if not base.exists():
            build_base(base, args.tiny)
        if not lora.exists():
            build_lora(lora, args.tiny)
        print(f"files: base {base.stat().st_size / 1e9:.2f} GB, LoCon {lora.stat().st_size / 1e6:.1f} MB "
              f"(built or found in {time.perf_counter() - t:.0f}s) in {work}")
        print(f"machine: {os.cpu_count()} CPUs, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        runs = []
        for i in range(args.runs):
            r = measure(base, lora, work / "out")
            runs.append(r)
            print(f"run {i + 1}: wall {r['wall_s']:.2f}s (imports {r['import_s']:.2f}s, resize() {r['resize_s']:.2f}s), "
                  f"CPU {r['cpu_s']:.2f}s, peak RSS {r['peak_rss_gb']:.2f} GB; kept {r['kept_dims']} dims, {r['params_out']:,} params; "
                  f"load {os.getloadavg()[0]:.2f}")
        best = min(runs, key=lambda r: r["wall_s"])
        chops = [measure(base, lora, work, _CHOP, (str(lora), VECTOR, str(work / "chopped.safetensors"))) for _ in range(args.runs)]
        plain = [measure(base, lora, work, _CHOP_BASELINE, (str(lora), VECTOR, str(work / "plain.safetensors"))) for _ in range(args.runs)]
        chop_best, plain_best = min(c["wall_s"] for c in chops), min(c["wall_s"] for c in plain)
        chop_peak, plain_peak = max(c["peak_rss_gb"] for c in chops), max(c["peak_rss_gb"] for c in plain)
        print(f"chop: wall {chop_best:.2f}s, peak RSS {chop_peak:.2f} GB; load_file + save_file of the kept keys: "
              f"wall {plain_best:.2f}s, peak RSS {plain_peak:.2f} GB")
        print(f"best: wall {best['wall_s']:.2f}s, peak RSS {max(r['peak_rss_gb'] for r in runs):.2f} GB (highest of the runs)")
        if not args.tiny:
            print(f"resize_lora on the same kind of files: wall {REFERENCE['wall_s']}s, peak RSS {REFERENCE['peak_rss_gb']} GB "
                  f"(target: no slower, peak under {REFERENCE['peak_rss_gb'] / 3:.2f} GB)")
        # resize_lora cannot be fetched here: its figures are the ones measured on this kind of
        # machine (checked-here.md), not from this run.
        ref = "resize_lora (checked-here)" if not args.tiny else ""
        write_rows([
            row(f"resize {'tiny' if args.tiny else 'full-size'} LoCon: wall", best["wall_s"], "s", "≤ resize_lora", None if args.tiny else REFERENCE["wall_s"], ref),
            row(f"resize {'tiny' if args.tiny else 'full-size'} LoCon: peak RSS", max(r["peak_rss_gb"] for r in runs), "GB",
                f"< {REFERENCE['peak_rss_gb'] / 3:.2f} GB", None if args.tiny else REFERENCE["peak_rss_gb"], ref),
            row(f"chop {'tiny' if args.tiny else 'full-size'} LoCon: wall", chop_best, "s", "-", plain_best, "load_file + save_file"),
            row(f"chop {'tiny' if args.tiny else 'full-size'} LoCon: peak RSS", chop_peak, "GB", "-", plain_peak, "load_file + save_file"),
        ], args.json)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
