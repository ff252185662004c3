"""Resize and chop a full-size SDXL LoCon (against a full-size base): wall time and peak RSS.

    python bench/resize_bench.py            # full size: a ~6 GB base and a ~117 M-parameter LoCon
    python bench/resize_bench.py --tiny     # the same on the tiny twin (seconds; keeps it from rotting)

Both files are random and built at run time in a temporary folder (never committed): the base is
SDXL's whole UNet plus both text encoders' MLPs in fp16, written one tensor at a time; the LoCon
has the seed recipe's module set (lycoris-lora's, on the same model: 788 UNet modules, 88 text
encoder MLPs; rank 8 alpha 4, 3x3 convs rank 256 alpha 4, capped as the trainer caps them) and
the metadata a trained file of the seed recipe carries. Its singular values spread over two
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
    write_streaming(
        path,
        specs,
        lambda key: (
            _random(shapes[key], g) if len(shapes[key]) > 1 else torch.zeros(shapes[key], dtype=torch.float16)
        ),
    )


def seed_modules(
    tiny: bool, preset=None, recipe=None
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], float]]:
    """kohya name → (down shape, up shape, alpha) of a LoCon built by lycoris-lora on SDXL (or the
    twin): the recipe's module set and ranks by default (the seed's), or those of `preset`."""
    import logging

    from lycoris import LycorisNetwork, create_lycoris

    from loradrop.engine.models import keymap
    from loradrop.engine.models.configs import sdxl_config, tiny_config
    from loradrop.engine.models.sdxl import build_empty
    from loradrop.engine.recipe import Recipe
    from loradrop.engine.train.network import Preset

    logging.getLogger("LyCORIS").setLevel(logging.WARNING)  # it logs every build at INFO
    recipe = recipe or Recipe()
    preset = preset or Preset.for_recipe(recipe)
    config = tiny_config() if tiny else sdxl_config()
    models = build_empty(config, ("unet", "te1", "te2"))
    names = keymap.UNetNames(config.unet)
    out = {}
    te = (preset.text_encoder_target_module, preset.text_encoder_target_name)
    for component, (modules, targets) in (
        ("unet", (preset.unet_target_module, preset.unet_target_name)),
        ("te1", te),
        ("te2", te),
    ):
        root = models[component]
        LycorisNetwork.apply_preset({"target_module": list(modules), "target_name": list(targets)})
        conv = {"conv_dim": recipe.conv_dim, "conv_alpha": recipe.conv_alpha} if preset.enable_conv else {}
        net = create_lycoris(
            root,
            1.0,
            linear_dim=recipe.network_dim,
            linear_alpha=recipe.network_alpha,
            algo=recipe.algo,
            **conv,
        )
        paths = {id(m): p for p, m in root.named_modules()}
        for lora in net.loras:
            path = paths[id(lora.org_module[0])]
            name = keymap.lora_name(component, path, names if component == "unet" else None)
            down, up = tuple(lora.lora_down.weight.shape), tuple(lora.lora_up.weight.shape)
            rank = min(
                down[0], up[0], math.prod(down[1:])
            )  # capped at what the layer allows, as the trainer does
            out[name] = ((rank, *down[1:]), (up[0], rank, *up[2:]), float(lora.alpha))
    return out


def lora_metadata(name: str, base: Path) -> dict[str, str]:
    """The metadata a trained file of the seed recipe carries (kohya's ss_* keys, the modelspec
    card, the base's hashes), for a LoCon that was built rather than trained: no images, no steps."""
    from loradrop.engine.models.hashes import model_hashes
    from loradrop.engine.recipe import Recipe
    from loradrop.engine.train import metadata

    recipe = Recipe(output_name=name)
    meta = metadata.training_metadata(
        recipe,
        captions=[],
        buckets=[],
        dataset_dir=Path(name),
        num_batches_per_epoch=0,
        world_size=1,
        model_path=str(base),
        model_hashes=model_hashes(base),
        started_at=time.time(),
    )
    return metadata.at_save(meta, recipe, step=0, epoch=0, title=name)


def build_lora(path: Path, tiny: bool, base: Path) -> int:
    from loradrop.engine.lora.lorafile import save_lora

    g = torch.Generator().manual_seed(1)
    tensors = {}
    for name, (down, up, alpha) in seed_modules(tiny).items():
        rank = down[0]
        # Columns of up spread over two decades, so singular values straddle the threshold.
        spread = torch.logspace(-1, 1, rank)[torch.randperm(rank, generator=g)]
        tensors[name + ".lora_down.weight"] = _random(down, g)
        tensors[name + ".lora_up.weight"] = (
            torch.randn(up, generator=g) * 3e-3 * spread.reshape(1, rank, *([1] * (len(up) - 2)))
        ).half()
        tensors[name + ".alpha"] = torch.tensor(alpha, dtype=torch.float16)
    save_lora(path, tensors, lora_metadata(path.stem, base))
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


def measure(
    base: Path, lora: Path, out: Path, code: str = _CHILD, args: tuple[str, ...] | None = None
) -> dict:
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
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="run on the tiny twin (seconds)")
    parser.add_argument(
        "--runs", type=int, default=2, help="resize runs (the first may read the base from disk)"
    )
    parser.add_argument("--json", type=Path, help="also write the result rows as JSON here")
    parser.add_argument(
        "--workdir",
        type=Path,
        help="keep the built files here and reuse them (default: a temporary folder, removed)",
    )
    args = parser.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="loradrop-resize-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    base, lora = work / "base.safetensors", work / "locon.safetensors"
    try:
        t = time.perf_counter()
        if not base.exists():
            build_base(base, args.tiny)
        if not lora.exists():
            build_lora(lora, args.tiny, base)
        print(
            f"files: base {base.stat().st_size / 1e9:.2f} GB, LoCon {lora.stat().st_size / 1e6:.1f} MB "
            f"(built or found in {time.perf_counter() - t:.0f}s) in {work}"
        )
        print(f"machine: {os.cpu_count()} CPUs, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        runs = []
        for i in range(args.runs):
            r = measure(base, lora, work / "out")
            runs.append(r)
            print(
                f"run {i + 1}: wall {r['wall_s']:.2f}s (imports {r['import_s']:.2f}s, resize() {r['resize_s']:.2f}s), "
                f"CPU {r['cpu_s']:.2f}s, peak RSS {r['peak_rss_gb']:.2f} GB; kept {r['kept_dims']} dims, {r['params_out']:,} params; "
                f"load {os.getloadavg()[0]:.2f}"
            )
        best = min(runs, key=lambda r: r["wall_s"])
        chops = [
            measure(base, lora, work, _CHOP, (str(lora), VECTOR, str(work / "chopped.safetensors")))
            for _ in range(args.runs)
        ]
        plain = [
            measure(base, lora, work, _CHOP_BASELINE, (str(lora), VECTOR, str(work / "plain.safetensors")))
            for _ in range(args.runs)
        ]
        chop_best, plain_best = min(c["wall_s"] for c in chops), min(c["wall_s"] for c in plain)
        chop_peak, plain_peak = max(c["peak_rss_gb"] for c in chops), max(c["peak_rss_gb"] for c in plain)
        print(
            f"chop: wall {chop_best:.2f}s, peak RSS {chop_peak:.2f} GB; load_file + save_file of the kept keys: "
            f"wall {plain_best:.2f}s, peak RSS {plain_peak:.2f} GB"
        )
        print(
            f"best: wall {best['wall_s']:.2f}s, peak RSS {max(r['peak_rss_gb'] for r in runs):.2f} GB (highest of the runs)"
        )
        if not args.tiny:
            print(
                f"resize_lora on the same kind of files: wall {REFERENCE['wall_s']}s, peak RSS {REFERENCE['peak_rss_gb']} GB "
                f"(target: no slower, peak under {REFERENCE['peak_rss_gb'] / 3:.2f} GB)"
            )
        # resize_lora cannot be fetched here: its figures are the ones measured on this kind of
        # machine (checked-here.md), not from this run.
        ref = "resize_lora (checked-here)" if not args.tiny else ""
        write_rows(
            [
                row(
                    f"resize {'tiny' if args.tiny else 'full-size'} LoCon: wall",
                    best["wall_s"],
                    "s",
                    "≤ resize_lora",
                    None if args.tiny else REFERENCE["wall_s"],
                    ref,
                ),
                row(
                    f"resize {'tiny' if args.tiny else 'full-size'} LoCon: peak RSS",
                    max(r["peak_rss_gb"] for r in runs),
                    "GB",
                    f"< {REFERENCE['peak_rss_gb'] / 3:.2f} GB",
                    None if args.tiny else REFERENCE["peak_rss_gb"],
                    ref,
                ),
                row(
                    f"chop {'tiny' if args.tiny else 'full-size'} LoCon: wall",
                    chop_best,
                    "s",
                    "-",
                    plain_best,
                    "load_file + save_file",
                ),
                row(
                    f"chop {'tiny' if args.tiny else 'full-size'} LoCon: peak RSS",
                    chop_peak,
                    "GB",
                    "-",
                    plain_peak,
                    "load_file + save_file",
                ),
            ],
            args.json,
        )
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
