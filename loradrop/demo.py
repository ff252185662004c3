"""`make demo`: the whole system once, on the embedded tiny model, in about a minute on a CPU.

It starts a daemon on a temporary home, drops a small synthetic dataset (captions, a
sample-prompts.txt, and a loradrop.toml that scales the recipe down and sets a block vector)
into the inbox, follows the job in the console to the end, prints where the trained, resized and
chopped LoRAs and the samples are, and stops the daemon. Everything it does goes through the
same API, CLI pieces and engine a user would use.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The seed recipe, scaled for a CPU: same algorithm and optimizer, small images, few steps.
DEMO_SETTINGS = {
    "name": "demo-lora",
    "block_vector": "1,0,0,0,0,0,0,0,0,0,0,0,0,1,0,0,0,0,0,0,0",  # the guide's example: OUT01 only
    "resolution": 64,
    "min_bucket_reso": 32,
    "max_bucket_reso": 128,
    "train_batch_size": 2,
    "gradient_accumulation_steps": 2,
    "max_train_steps": 24,
    "save_every_n_steps": 6,
    "sample_every_n_steps": 8,
}
PROMPTS = [
    "zkw creature, standing, green meadow --w 96 --h 96 --s 8 --d 1",
    "zkw creature, sitting, night sky --w 96 --h 96 --s 8 --d 2",
]
BACKGROUNDS = {"green meadow": (70, 150, 60), "night sky": (20, 24, 60), "sandy beach": (225, 200, 140), "white studio": (240, 240, 240)}


def make_demo_dataset(folder: Path, images: int = 8) -> Path:
    """A made-up character, "zkw creature": an orange blob with eyes on a few backgrounds and
    aspect ratios, each with a tag-style caption."""
    from PIL import Image, ImageDraw

    import tomli_w

    rng = random.Random(7)
    folder.mkdir(parents=True)
    for i in range(images):
        w, h = rng.choice([(96, 96), (128, 96), (96, 128)])
        place, colour = rng.choice(sorted(BACKGROUNDS.items()))
        pose = rng.choice(["standing", "sitting"])
        img = Image.new("RGB", (w, h), colour)
        d = ImageDraw.Draw(img)
        cx, cy, r = w // 2 + rng.randint(-10, 10), h // 2 + rng.randint(-6, 10), min(w, h) // 4
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(240, 120, 20))
        for ex in (cx - r // 3, cx + r // 3):
            d.ellipse([ex - 4, cy - r // 3 - 4, ex + 4, cy - r // 3 + 4], fill=(255, 255, 255))
            d.ellipse([ex - 2, cy - r // 3 - 2, ex + 2, cy - r // 3 + 2], fill=(0, 0, 0))
        img.save(folder / f"zkw-{i:02d}.png")
        (folder / f"zkw-{i:02d}.txt").write_text(f"zkw creature, {pose}, {place}, orange, round\n")
    (folder / "sample-prompts.txt").write_text("# rendered every 8 steps\n" + "\n".join(PROMPTS) + "\n")
    (folder / "loradrop.toml").write_text(tomli_w.dumps(DEMO_SETTINGS))
    return folder


def main() -> int:
    from loradrop.commands.logs import event_line
    from loradrop.progress import ProgressLine, describe_progress
    from loradrop.proto.client import Client, state_name

    started = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="loradrop-demo-", dir="/tmp"))  # short: socket paths are limited
    home = root / "home"
    print(f"demo home: {home}")
    log_path = root / "daemon.log"
    daemon = subprocess.Popen(
        [sys.executable, "-m", "loradrop", "daemon", "--home", str(home), "--quiet-seconds", "1"],
        stdout=open(log_path, "wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )
    try:
        client = _connect(home / "daemon.sock", daemon, log_path)
        staging = make_demo_dataset(root / "zkw-creature")
        os.rename(staging, home / "inbox" / staging.name)  # one atomic drop into the watched inbox
        print(f"dropped {staging.name}/ (8 captioned images, sample-prompts.txt, loradrop.toml) into the inbox")
        job = _wait_for_job(client)
        print(f"job {job.id} queued; following it (the same stream `loradrop logs -f {job.id}` shows)")

        bar = ProgressLine(sys.stdout)
        final_state = None
        for event in client.events(job.id):
            body = event.WhichOneof("body")
            if body == "progress":
                p = event.progress
                payload = {f: getattr(p, f) for f in ("loss", "avg_loss", "lr_unet", "rate", "eta_s") if p.HasField(f)}
                bar.update("step" if p.stage == "train" else p.stage, p.done, p.total, describe_progress(payload))
            else:
                bar.message(event_line(event))
            if body == "state" and state_name(event.state.state) in ("done", "failed", "cancelled"):
                final_state = state_name(event.state.state)
                break
        bar.close()

        artifacts = {a.kind: a for a in client.artifacts(job.id)}
        print()
        print(f"job {job.id}: {final_state} in {time.monotonic() - started:.0f} s")
        for kind, label in (("final", "trained LoRA"), ("resized", "resized"), ("chopped", "chopped")):
            if kind in artifacts:
                a = artifacts[kind]
                print(f"  {label:13} {a.path}  ({a.bytes / 1e6:.2f} MB)")
        samples = sorted((home / "outputs" / job.id / "samples").glob("*.png"))
        print(f"  samples       {len(samples)} PNGs in {samples[0].parent if samples else '(none)'}")
        print(f"  everything    {home / 'outputs' / job.id}   (remove {root} when done)")
        return 0 if final_state == "done" else 1
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.kill()
        print("daemon stopped")


def _connect(socket: Path, daemon: subprocess.Popen, log_path: Path):
    from loradrop.proto.client import Client, ClientError

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            raise SystemExit(f"the daemon exited ({daemon.returncode}); its log:\n{log_path.read_text()}")
        if socket.exists():
            client = Client(f"unix:{socket}")
            try:
                client.status()
                return client
            except ClientError:
                pass
        time.sleep(0.2)
    raise SystemExit(f"the daemon did not answer within 60 s; its log: {log_path}")


def _wait_for_job(client):
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        jobs = client.jobs()
        if jobs:
            return jobs[0]
        time.sleep(0.2)
    raise SystemExit("the dropped folder did not become a job within 60 s")


if __name__ == "__main__":
    sys.exit(main())
