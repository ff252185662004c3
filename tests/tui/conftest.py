"""Fixtures for the TUI tests: real daemons on temporary homes, and the app driven by Textual's pilot.

`Daemon`, `make_dataset` and `wait_for` come from tests/support.py, shared with the daemon tests.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file

from loradrop.proto.v1 import loradrop_pb2 as pb  # noqa: E402
from loradrop.testing import Daemon, make_dataset, wait_for  # noqa: E402

QUIET = 0.5  # seconds an inbox folder must be still before it becomes a job
# Two steps on the tiny twin, a sample of each prompt after each: the least a montage needs.
SAMPLED = {"max_train_steps": 2, "sample_every_n_steps": 1}
PROMPTS = ["a zkw thing, red --w 64 --h 64 --s 2", "a zkw thing, blue --w 64 --h 64 --s 2"]


def short_dir() -> Path:
    # A unix socket path must stay under ~100 characters: no pytest tmp_path here.
    return Path(tempfile.mkdtemp(prefix="ldt-", dir="/tmp"))


@pytest.fixture
def homes():
    """`homes()` gives a fresh daemon home; all are removed at the end."""
    roots: list[Path] = []

    def make() -> Path:
        roots.append(short_dir())
        return roots[-1] / "home"

    yield make
    for root in roots:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def start_daemon(homes):
    """`start_daemon(*args)` runs `loradrop daemon` on a fresh home; killed at the end if still running."""
    started: list[Daemon] = []

    def start(*args: str, home: Path | None = None) -> Daemon:
        d = Daemon(home or homes(), "--quiet-seconds", str(QUIET), *args)
        started.append(d)
        return d.start()

    yield start
    for d in started:
        if d.process and d.process.poll() is None:
            d.kill()


def known_colours(step: int, prompt: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """The left and right halves of the picture that replaces a trained job's sample."""
    table = {0: ((255, 0, 0), (0, 0, 255)), 1: ((0, 200, 0), (255, 255, 0))}
    left, right = table[prompt % 2]
    shade = step % 3 * 40  # each step a little different, so a montage's frames can be told apart
    return (left[0], min(left[1] + shade, 255), left[2]), right


@dataclass
class Trained:
    daemon: Daemon
    job: pb.Job
    samples: list[pb.SampleReady]
    colours = staticmethod(known_colours)


@pytest.fixture(scope="session")
def trained():
    """A daemon with one job trained end to end (samples at steps 1 and 2, a resized LoRA), shared
    by the tests that only look at it. Its sample images are then overwritten with two-colour
    pictures (`known_colours`), so a test can tell where they show up and in which order."""
    root = short_dir()
    daemon = Daemon(root / "home", "--quiet-seconds", str(QUIET)).start()
    try:
        make_dataset(daemon.home / "inbox" / "zkw", settings=SAMPLED, prompts=PROMPTS)
        with daemon.client() as c:
            job = wait_for(lambda: c.jobs(), what="the dropped folder to become a job")[0]
            job = c.wait_job(job.id, 600, interval=0.5)
            assert job.state == pb.DONE, f"{job.error}\n{daemon.log()}"
            samples = [e.sample for e in c.events(job.id, follow=False) if e.HasField("sample")]
        for s in samples:
            left, right = known_colours(s.step, s.prompt_index)
            image = Image.new("RGB", (64, 64), left)
            image.paste(right, (32, 0, 64, 64))
            image.save(s.path)
        yield Trained(daemon, job, samples)
    finally:
        daemon.stop()
        shutil.rmtree(root, ignore_errors=True)


def synthetic_lora(path: Path) -> Path:
    """A small kohya LoCon with fixed values: modules in six UNet blocks and a text encoder."""
    rng = np.random.RandomState(0)
    modules = {
        "lora_unet_input_blocks_1_0_in_layers_2": (4, 36),
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": (8, 8),
        "lora_unet_input_blocks_7_1_transformer_blocks_0_attn1_to_k": (16, 16),
        "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_v": (16, 16),
        "lora_unet_output_blocks_0_1_transformer_blocks_0_ff_net_2": (16, 16),
        "lora_unet_output_blocks_5_1_transformer_blocks_0_attn1_to_out_0": (8, 8),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1": (12, 8),
    }
    tensors = {}
    for i, (name, (out, inp)) in enumerate(modules.items()):
        scale = 0.2 * (i + 1)
        tensors[f"{name}.lora_down.weight"] = (scale * rng.standard_normal((2, inp))).astype(np.float16)
        tensors[f"{name}.lora_up.weight"] = (scale * rng.standard_normal((out, 2))).astype(np.float16)
        tensors[f"{name}.alpha"] = np.array(1.0, dtype=np.float16)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


@pytest.fixture
def lora():
    """`lora(path)`: write a small synthetic LoCon there."""
    return synthetic_lora


class Pilot:
    """Runs the app against a daemon at 80x24 with half-cell pictures, and waits for conditions."""

    size = (80, 24)

    def run(
        self,
        connect: str,
        scenario: Callable[..., Awaitable[None]],
        *,
        size: tuple[int, int] | None = None,
        protocol: str = "halfcell",
    ) -> None:
        from loradrop.tui.app import LoradropApp
        from loradrop.tui.images import Pictures, image_widget_class
        from loradrop.tui.link import Target

        async def main() -> None:
            app = LoradropApp(Target(connect), Pictures(image_widget_class(protocol)), retry_delay=0.1)
            async with app.run_test(size=size or self.size) as pilot:
                await scenario(app, pilot)

        asyncio.run(main())

    @staticmethod
    async def type_ahead(pilot, *keys: str) -> None:
        """Keys as one terminal write sends them (tmux send-keys, type-ahead over ssh): every one
        queued before the app handles the first; `pilot.press` instead waits after each key."""
        from textual import events

        named = {"enter": "\r", "space": " ", "tab": "\t", "escape": "\x1b"}
        for key in keys:
            pilot.app.post_message(events.Key(key, key if len(key) == 1 else named.get(key)))
        await pilot.pause(0.1)
        await pilot.pause()

    @staticmethod
    async def until(pilot, predicate: Callable[[], object], timeout: float = 30, what: str = "condition"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            await pilot.pause(0.05)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture
def tui() -> Pilot:
    return Pilot()


@pytest.fixture
def dataset():
    """`dataset(folder)`: a tiny captioned dataset with the test recipe (no samples)."""
    return make_dataset
