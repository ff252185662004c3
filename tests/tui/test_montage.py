"""`loradrop montage`: a trained job's samples of one prompt, fetched over the API, as an animation."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from PIL import Image, ImageSequence

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def montage(trained, *args: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "loradrop",
        "montage",
        trained.job.id,
        "--connect",
        trained.daemon.connect,
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("suffix", ["webp", "gif"])
def test_frames_are_the_prompts_samples_oldest_first(trained, tmp_path, suffix):
    out = tmp_path / f"m.{suffix}"
    done = montage(trained, "-o", str(out), "--prompt", "1", "--fps", "5", "--size", "0")
    assert done.returncode == 0, done.stderr
    steps = sorted(s.step for s in trained.samples if s.prompt_index == 1)
    with Image.open(out) as image:
        frames = [(f.convert("RGB"), f.info.get("duration")) for f in ImageSequence.Iterator(image)]
    assert len(frames) == len(steps) >= 2
    for (frame, _), step in zip(frames, steps):
        left, right = trained.colours(step, 1)
        assert frame.width == 64 and frame.height > 64  # the sample, and the caption bar below it
        for got, want in ((frame.getpixel((16, 32)), left), (frame.getpixel((48, 32)), right)):
            assert max(abs(a - b) for a, b in zip(got, want)) <= 12, (
                step,
                got,
                want,
            )  # lossy WebP, GIF palette
    durations = [d for _, d in frames]
    assert durations[0] == 200 and durations[-1] > durations[0]  # 5 fps; the last frame is held


def test_mp4_needs_ffmpeg(trained, tmp_path):
    out = tmp_path / "m.mp4"
    done = montage(trained, "-o", str(out))
    if shutil.which("ffmpeg"):
        assert done.returncode == 0, done.stderr
        assert out.read_bytes()[4:8] == b"ftyp"
    else:
        assert done.returncode == 2 and "needs ffmpeg" in done.stderr and not out.exists()


def test_a_prompt_without_samples_is_refused_in_one_sentence(trained, tmp_path):
    done = montage(trained, "-o", str(tmp_path / "m.webp"), "--prompt", "7")
    assert done.returncode == 2
    assert "has no samples of prompt 7; its prompts are 0, 1" in done.stderr
    assert "Traceback" not in done.stderr
