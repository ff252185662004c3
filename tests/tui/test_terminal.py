"""`loradrop tui` in real terminals: xterm drawing a sample as sixel pixels under Xvfb (checked on
a screenshot), and tmux showing the queue and a growing log while a job trains."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageGrab

from loradrop.testing import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
COLUMNS, ROWS = 130, 44  # xterm's 6x13 cells: 780x572 pixels, so 600x450 is smaller both ways


def tui_command(connect: str, protocol: str) -> list[str]:
    return [sys.executable, "-m", "loradrop", "tui", "--connect", connect, "--image-protocol", protocol]


def needs(*programs: str):
    """Skip (before any fixture is set up) when a program is missing."""
    missing = [p for p in programs if shutil.which(p) is None]
    return pytest.mark.skipif(
        bool(missing), reason=f"needs {', '.join(missing)} (Debian packages xterm, xvfb, xdotool, tmux)"
    )


@pytest.fixture
def display():
    """A private X display (Xvfb), stopped at the end."""
    number = next(
        n
        for n in range(90, 400)
        if not Path(f"/tmp/.X{n}-lock").exists() and not Path(f"/tmp/.X11-unix/X{n}").exists()
    )
    server = subprocess.Popen(
        ["Xvfb", f":{number}", "-screen", "0", "800x600x24", "-nolisten", "tcp"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: Path(f"/tmp/.X11-unix/X{number}").exists(), timeout=15, what="Xvfb to start")
        yield f":{number}"
    finally:
        server.terminate()
        server.wait(10)


def screenshot(env: dict, path: Path) -> Image.Image:
    image = ImageGrab.grab(xdisplay=env["DISPLAY"])  # kept, to look at when a test fails
    image.save(path)
    return image.convert("RGB")


def region(
    image: Image.Image, colour: tuple[int, int, int], tolerance: int = 24
) -> tuple[int, tuple[int, int, int, int] | None]:
    """How many pixels have about `colour`, and their bounding box (left, top, right, bottom)."""
    mask = (np.abs(np.asarray(image, dtype=np.int16) - np.array(colour)) <= tolerance).all(axis=2)
    if not mask.any():
        return 0, None
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    return int(mask.sum()), (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)


@needs("Xvfb", "xterm", "xdotool")
def test_xterm_shows_the_sample_as_sixel_pixels(trained, display, tmp_path):
    newest = max(s.step for s in trained.samples)
    left, right = trained.colours(newest, 0)
    env = {**os.environ, "DISPLAY": display}
    command = tui_command(trained.daemon.connect, "sixel")
    xterm = subprocess.Popen(
        ["xterm", "-ti", "vt340", "-geometry", f"{COLUMNS}x{ROWS}+0+0", "-e", *command],
        env=env,
        stderr=subprocess.DEVNULL,
    )
    shot = tmp_path / "xterm.png"
    try:
        time.sleep(1)
        subprocess.run(
            ["xdotool", "mousemove", "40", "40"], env=env, check=True
        )  # keys go to the window under the pointer

        def queue_drawn() -> bool:
            return region(screenshot(env, shot), (0, 0, 0))[0] < 0.95 * 800 * 600  # more than a black screen

        wait_for(queue_drawn, timeout=60, interval=0.5, what="the TUI to draw")
        time.sleep(2)  # connected and the job listed
        subprocess.run(["xdotool", "key", "Return", "g"], env=env, check=True)

        def picture() -> tuple | None:
            image = screenshot(env, shot)
            (n_left, box_left), (n_right, box_right) = region(image, left), region(image, right)
            return (image, box_left, box_right) if n_left > 400 and n_right > 400 else None

        image, box_left, box_right = wait_for(
            picture,
            timeout=60,
            interval=0.5,
            what=f"the sample's colours on the screen (last screenshot: {shot})",
        )

        # A smaller window: soon the whole picture again, square, inside the window. Meanwhile
        # (screenshots as fast as they come) the screen shows the old picture until the TUI
        # redraws, then nothing or the new one where it settles, never a mix of the two nor a
        # strip: for 1-1.5 s after a resize that was all there was.
        window = subprocess.run(
            ["xdotool", "search", "--pid", str(xterm.pid)], env=env, capture_output=True, text=True
        ).stdout.split()[0]
        subprocess.run(["xdotool", "windowsize", window, "600", "450"], env=env, check=True)
        resized, frames = time.monotonic(), []
        while time.monotonic() - resized < 2.0:
            frame = ImageGrab.grab(xdisplay=env["DISPLAY"]).convert("RGB")
            frames.append((time.monotonic() - resized, region(frame, left), region(frame, right)))

        def whole_in(width: int, height: int):
            got = picture()
            if got is None:
                return None
            _, left_box, right_box = got
            w, h = right_box[2] - left_box[0], max(left_box[3], right_box[3]) - min(left_box[1], right_box[1])
            return got if right_box[2] <= width and left_box[3] <= height and abs(w - h) <= 0.1 * h else None

        wait_for(
            lambda: whole_in(600, 450),
            timeout=3,
            interval=0.1,
            what=f"the whole picture after the resize (last screenshot: {shot})",
        )
        settled = screenshot(env, shot)
        (n_left, final_left), (n_right, final_right) = region(settled, left), region(settled, right)
        final = (
            final_left[0],
            min(final_left[1], final_right[1]),
            final_right[2],
            max(final_left[3], final_right[3]),
        )
        before = (box_left[0], min(box_left[1], box_right[1]), box_right[2], max(box_left[3], box_right[3]))
        for at, (seen_left, box_l), (seen_right, box_r) in frames:
            boxes = [box for box in (box_l, box_r) if box is not None]
            new = all(_inside(box, final, slack=3) for box in boxes)
            old = at < 0.5 and all(_inside(box, before, slack=3) for box in boxes)  # not redrawn yet
            assert new or old, (
                f"{at:.2f} s after the resize: picture pixels at {boxes}; the old picture was at {before}, "
                f"the new one settles at {final}"
            )
            if boxes and new and at > 0.5:  # drawn part way, for longer than the drawing takes
                assert seen_left + seen_right >= 0.9 * (n_left + n_right), (
                    f"{at:.2f} s after the resize: {seen_left + seen_right} of the picture's {n_left + n_right} pixels"
                )
    finally:
        xterm.terminate()
        xterm.wait(10)
    # The two halves sit side by side inside the xterm window, as wide as each other, the left
    # one on the left, and their middles have the picture's colours (sixel gives colours in
    # percent: a unit or two off).
    window = (0, 0, 800, 600)
    assert box_left[2] <= box_right[0] + 2 and box_right[2] <= window[2]
    assert abs((box_left[3] - box_left[1]) - (box_right[3] - box_right[1])) <= 2
    assert abs((box_left[2] - box_left[0]) - (box_right[2] - box_right[0])) <= 0.2 * (
        box_right[2] - box_right[0]
    )
    for box, colour in ((box_left, left), (box_right, right)):
        middle = ((box[0] + box[2]) // 2, (box[1] + box[3]) // 2)
        got = image.getpixel(middle)
        assert max(abs(a - b) for a, b in zip(got, colour)) <= 3, (middle, got, colour)


def _inside(box: tuple[int, int, int, int], within: tuple[int, int, int, int], slack: int) -> bool:
    return (
        box[0] >= within[0] - slack
        and box[1] >= within[1] - slack
        and box[2] <= within[2] + slack
        and box[3] <= within[3] + slack
    )


@needs("tmux")
def test_tmux_shows_the_queue_and_a_growing_log(start_daemon, dataset):
    daemon = start_daemon()
    server = f"ldt-{os.getpid()}"
    tmux = ["tmux", "-L", server]
    subprocess.run(
        [
            *tmux,
            "new-session",
            "-d",
            "-s",
            "tui",
            "-x",
            "80",
            "-y",
            "24",
            *tui_command(daemon.connect, "halfcell"),
        ],
        check=True,
    )

    def screen() -> str:
        return subprocess.run(
            [*tmux, "capture-pane", "-p", "-t", "tui"], capture_output=True, text=True, check=True
        ).stdout

    try:
        wait_for(lambda: "connected" in screen(), timeout=30, what="the TUI to connect")
        dataset(daemon.home / "inbox" / "zkw")  # 4 steps: a line for each step's checkpoint
        wait_for(
            lambda: re.search(r"1\s+zkw\s+(queued|running)", screen()),
            timeout=30,
            what=f"the job in the queue:\n{screen()}",
        )
        subprocess.run([*tmux, "send-keys", "-t", "tui", "Enter"], check=True)
        lines = lambda: len(re.findall(r"^\d\d:\d\d:\d\d \[\d+\]", screen(), re.M))  # noqa: E731
        first = wait_for(lines, timeout=30, what=f"the job's log:\n{screen()}")
        wait_for(lambda: "running" in screen(), timeout=120, what=f"the job to run:\n{screen()}")
        wait_for(lambda: lines() > first + 2, timeout=300, what=f"the log to grow:\n{screen()}")
        assert "0001-zkw" in screen()
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)


@needs("tmux")
def test_tmux_keys_sent_in_one_write_act_in_order(start_daemon, dataset):
    daemon = start_daemon("--workers", "0")
    for name in ("cats", "dogs"):
        dataset(daemon.home / "inbox" / name)
    server = f"ldt-keys-{os.getpid()}"
    tmux = ["tmux", "-L", server]
    subprocess.run(
        [
            *tmux,
            "new-session",
            "-d",
            "-s",
            "tui",
            "-x",
            "80",
            "-y",
            "24",
            *tui_command(daemon.connect, "none"),
        ],
        check=True,
    )

    def screen() -> str:
        return subprocess.run(
            [*tmux, "capture-pane", "-p", "-t", "tui"], capture_output=True, text=True, check=True
        ).stdout

    def ready() -> bool:
        """Both jobs listed, in order, and the line below the table names the one under the cursor:
        the first (the rows of jobs that arrive together can come in either order)."""
        text = screen()
        return bool(re.search(r"\b1\s+cats\b[^\n]*\n[^\n]*\b2\s+dogs\b", text)) and "0001-cats queued" in text

    try:
        wait_for(ready, timeout=60, what=f"both jobs in the queue, the cursor on the first:\n{screen()}")
        subprocess.run([*tmux, "send-keys", "-t", "tui", "Down", "Enter"], check=True)  # one write
        wait_for(
            lambda: "0002-dogs" in screen() and "log l" in screen(),
            timeout=30,
            what=f"the second job's screen:\n{screen()}",
        )
        assert "0001-cats" not in screen()
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)
