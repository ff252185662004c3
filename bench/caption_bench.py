"""Captioning's own overhead: images/s through `caption_folder` with the tiny WD14-layout tagger on
the CPU, so nearly all the time is the code path (decode, pad, resize to 448, onnxruntime, select
tags, write atomically), not a model. Beside it, the same images only decoded (load_rgb), the floor
any captioner pays.

    python bench/caption_bench.py [--images 64] [--size 1024x768] [--batch-size 4] [--runs 2]

The images are random-noise JPEGs written at run time in a temporary folder; the tagger is built
at WD14's real input size (448) so the resize costs what it costs with a real one. A real WD14
model adds its own inference time on top (a ViT-L at 448 px: about 0.1 s per image on a CPU
core, milliseconds on a GPU).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.rows import row, table, write_rows  # noqa: E402
from loradrop.engine.caption import Existing, TaggerSpec, caption_folder  # noqa: E402
from loradrop.engine.caption.tiny import make_tiny_tagger  # noqa: E402
from loradrop.engine.data.images import load_rgb  # noqa: E402


def write_images(folder: Path, count: int, width: int, height: int) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = folder / f"{i:04d}.jpg"
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", default="1024x768", help="WIDTHxHEIGHT of the images (default 1024x768)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--runs", type=int, default=2, help="best of this many (default 2)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))
    root = Path(tempfile.mkdtemp(prefix="loradrop-caption-bench-"))
    try:
        folder = root / "images"
        folder.mkdir()
        paths = write_images(folder, args.images, width, height)
        spec = TaggerSpec(
            make_tiny_tagger(root / "tagger", size=448), batch_size=args.batch_size, device="cpu"
        )
        caption_s, decode_s = [], []
        for _ in range(args.runs):
            result = caption_folder(
                folder, spec, existing=Existing.OVERWRITE
            )  # its clock starts after loading the model
            assert len(result.failed) == 0, result.failed[:1]
            caption_s.append(result.seconds)
            start = time.perf_counter()
            for path in paths:
                load_rgb(path)
            decode_s.append(time.perf_counter() - start)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    n = args.images
    rows = [
        row(
            f"caption, tiny WD14 tagger, CPU ({width}x{height} JPEG)",
            n / min(caption_s),
            "img/s",
            "- (the code path's overhead)",
            n / min(decode_s),
            "decode only",
        ),
    ]
    print(table(rows))
    write_rows(rows, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
