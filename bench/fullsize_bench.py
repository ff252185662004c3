"""The whole chain at full SDXL size on this CPU: train one update, resize, chop, load in diffusers.

    python bench/fullsize_bench.py [--workdir DIR] [--json OUT]

A smoke run, not a speed test of the recipe (that is bench/gpu_bench.py, on a GPU): it shows
that full-size files go through every tool. A random full-size SDXL single file is written from
the bundled configs (UNet, VAE, both text encoders: ~6.9 GB, fp16, in a temporary folder), then
each step runs as the user runs it, in its own process, timed from start to exit with its peak
RSS (from wait4; this parent never loads torch, so its own size does not leak into the figure):
  train   `loradrop train` on one 256x256 captioned image: batch 1, one update, the seed's LoCon
          (fp32 on a CPU, as the trainer runs there);
  resize  `loradrop resize` of the trained file against the checkpoint, the guide's recipe;
  chop    `loradrop chop` of the trained file to the guide's vector (output_blocks.1 only);
  load    each of the three files through StableDiffusionXLPipeline.load_lora_weights into a
          full-size UNet and text encoders built on the meta device (no weights: a key check);
          every module of each file must be adapted, and diffusers must report no stray key.

On this project's development machine (2 cores, 23 GB, no GPU), 2026-12-03: checkpoint written
in 50 s; train 112 s wall (the update itself 36 s), 19.8 GB peak RSS, a 234 MB LoRA; resize
12.7 s, 0.70 GB (the guide's thr=-3.55 kept 2446 of 16432 dimensions in 865 of 876 modules);
chop 2.0 s, 0.31 GB; diffusers adapts 876, 865 and 194 modules of the three files,
all of them. The train peak leaves ~3 GB of that machine free: run nothing large beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.rows import row, table, write_rows  # noqa: E402

GUIDE_VECTOR = "1,0,0,0,0,0,0,0,0,0,0,0,0,1,0,0,0,0,0,0,0"
TRAIN_SETTINGS = [
    "resolution=256",
    "train_batch_size=1",
    "gradient_accumulation_steps=1",
    "max_train_steps=1",
    "sample_every_n_steps=0",
    "log_with=none",
    "max_data_loader_n_workers=0",
]

_BUILD = """
import sys
from pathlib import Path
from PIL import Image, ImageDraw
from bench.load_bench import build_checkpoint
build_checkpoint(Path(sys.argv[1]))
data = Path(sys.argv[2])
data.mkdir(parents=True, exist_ok=True)
image = Image.effect_noise((256, 256), 40).convert("RGB")
ImageDraw.Draw(image).ellipse((64, 64, 192, 192), fill=(200, 40, 40))
image.save(data / "red-circle.png")
(data / "red-circle.txt").write_text("a red circle on grey noise")
"""

_LOAD = """
import json, logging, sys, warnings
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
from peft.tuners.tuners_utils import BaseTunerLayer
from loradrop.engine.lora.lorafile import read_lora
from loradrop.engine.models.configs import sdxl_config
from loradrop.engine.models.sdxl import build_empty

config = sdxl_config()
said = []
class Said(logging.Handler):
    def emit(self, record):
        said.append(record.getMessage())
for name in ("diffusers", "peft"):
    logging.getLogger(name).addHandler(Said(logging.WARNING))
out = {}
for path in sys.argv[1:]:
    m = build_empty(config, ("unet", "vae", "te1", "te2"))
    pipe = StableDiffusionXLPipeline(vae=m["vae"], text_encoder=m["te1"], text_encoder_2=m["te2"], tokenizer=None, tokenizer_2=None,
                                     unet=m["unet"], scheduler=EulerDiscreteScheduler.from_config(config.scheduler))
    said.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe.load_lora_weights(path, low_cpu_mem_usage=True)
    adapted = sum(isinstance(x, BaseTunerLayer) for c in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2) for x in c.modules())
    stray = [s[:200] for s in said + [str(w.message) for w in caught] if "unexpected" in s.lower() or "not loaded" in s.lower()]
    out[path] = {"modules": len(read_lora(path).names), "adapted": adapted, "stray": stray}
print(json.dumps(out))
"""


def run(argv: list[str], what: str) -> dict:
    """One step in its own process: wall time and peak RSS (ru_maxrss of the child)."""
    start = time.perf_counter()
    child = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, text=True)
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{what} failed (exit code {os.waitstatus_to_exitcode(status)})")
    return {
        "wall_s": wall,
        "peak_rss_gb": usage.ru_maxrss * 1024 / 1e9,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "out": output,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        help="keep the files here and reuse the checkpoint (default: a temporary folder, removed)",
    )
    parser.add_argument("--json", type=Path, help="also write the result rows as JSON here")
    args = parser.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="loradrop-fullsize-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    base, data, out = work / "sdxl-random.safetensors", work / "red-circle", work / "out"
    py = sys.executable
    try:
        if not base.exists():
            built = run([py, "-c", _BUILD, str(base), str(data)], "writing the checkpoint")
            print(
                f"checkpoint: {base.stat().st_size / 1e9:.2f} GB written in {built['wall_s']:.0f} s",
                flush=True,
            )
        shutil.rmtree(out, ignore_errors=True)
        sets = [a for s in TRAIN_SETTINGS for a in ("--set", s)]
        trained = run(
            [
                py,
                "-m",
                "loradrop",
                "train",
                str(data),
                "-o",
                str(out),
                "--model",
                str(base),
                "--device",
                "cpu",
                "--cache-dir",
                str(work / "cache"),
                *sets,
            ],
            "loradrop train",
        )
        lora = out / f"{data.name}.safetensors"
        print(
            f"train: {trained['wall_s']:.0f} s wall, {trained['cpu_s']:.0f} s CPU, peak RSS {trained['peak_rss_gb']:.1f} GB; "
            f"{lora.stat().st_size / 1e6:.0f} MB LoRA",
            flush=True,
        )
        resized = run(
            [py, "-m", "loradrop", "resize", str(base), str(lora), "-o", str(out), "--device", "cpu"],
            "loradrop resize",
        )
        resized_path = Path(resized["out"].strip().splitlines()[-1].removeprefix("wrote "))
        print(
            f"resize: {resized['wall_s']:.1f} s, peak RSS {resized['peak_rss_gb']:.2f} GB; "
            + "; ".join(resized["out"].splitlines()[:2]),
            flush=True,
        )
        chopped = run([py, "-m", "loradrop", "chop", str(lora), GUIDE_VECTOR], "loradrop chop")
        chopped_path = Path(chopped["out"].strip().splitlines()[-1].removeprefix("wrote "))
        print(f"chop: {chopped['wall_s']:.1f} s, peak RSS {chopped['peak_rss_gb']:.2f} GB", flush=True)
        files = [lora, resized_path, chopped_path]
        loaded = run([py, "-c", _LOAD, *map(str, files)], "the diffusers key check")
        report = json.loads(loaded["out"].strip().splitlines()[-1])
        bad = 0
        for path, r in report.items():
            ok = r["adapted"] == r["modules"] and not r["stray"]
            bad += not ok
            print(
                f"diffusers (full-size, meta weights): {Path(path).name}: {r['adapted']} of {r['modules']} modules adapted"
                + ("" if ok else f"  FAILED {r['stray'][:2]}"),
                flush=True,
            )
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    rows = [
        row("full-size train, CPU, 256², batch 1, 1 update: wall", trained["wall_s"], "s", "runs (smoke)"),
        row("full-size train, CPU: peak RSS", trained["peak_rss_gb"], "GB", "fits this machine"),
        row("full-size resize of the trained file: wall", resized["wall_s"], "s", "runs (smoke)"),
        row("full-size chop of the trained file: wall", chopped["wall_s"], "s", "runs (smoke)"),
        row(
            "full-size files whose every module diffusers adapts",
            len(files) - bad,
            "files",
            f"all {len(files)}",
        ),
    ]
    print(table(rows))
    write_rows(rows, args.json)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
