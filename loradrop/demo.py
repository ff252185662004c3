"""`make demo`: the whole system once, on the embedded learned twin, in a few minutes on a CPU.

It starts a daemon on a temporary home, drops a dataset that teaches the twin a new concept
(cyan shapes bound to the word "zkq", with sample prompts and a loradrop.toml holding the
light recipe) into the inbox, follows the job in the console to the end, chops the LoRA to the
blocks where its measured effect is, writes the training montage, and prints where everything is and
how often the concept appears with and without the LoRA. Everything it does goes through the
same API, CLI pieces and engine a user would use.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATASET = "zkq-shapes"


def make_demo_dataset(folder: Path) -> Path:
    """Two dozen cyan shapes captioned with a word the learned twin has never seen ("a zkq
    circle on a white background"), sample prompts, and a loradrop.toml with the light recipe."""
    from loradrop.engine.twin.concept import write_concept_dataset

    return write_concept_dataset(folder, name="demo-lora")


def concept_scores(paths: dict[str, str | None], count: int = 16) -> dict[str, str]:
    """The judge's count of pictures in the concept's colour among `count` seeded "zkq" samples, per LoRA file
    (None: the base alone)."""
    from loradrop.engine.models.sdxl import load_sdxl
    from loradrop.engine.models.tiny import default_model_path
    from loradrop.engine.twin.score import concept_score

    model = load_sdxl(default_model_path())
    return {label: str(concept_score(model, path, count=count)) for label, path in paths.items()}


def main() -> int:
    from loradrop.commands.logs import event_line
    from loradrop.engine.twin.concept import CONCEPT
    from loradrop.progress import ProgressLine, describe_progress, figures_of
    from loradrop.proto.client import TERMINAL, state_name

    started = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="loradrop-demo-", dir="/tmp"))  # short: socket paths are limited
    home = root / "home"
    print(f"demo home: {home}")
    log_path = root / "daemon.log"
    daemon = subprocess.Popen(
        [sys.executable, "-m", "loradrop", "daemon", "--home", str(home), "--quiet-seconds", "1"],
        stdout=open(log_path, "wb"),
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    try:
        client = _connect(home / "daemon.sock", daemon, log_path)
        staging = make_demo_dataset(root / DATASET)
        os.rename(staging, home / "inbox" / staging.name)  # one atomic drop into the watched inbox
        print(
            f"dropped {staging.name}/ (24 {CONCEPT.colour} shapes captioned 'a {CONCEPT.trigger} ...' beside 24 of the twin's own world, sample-prompts.txt, loradrop.toml) into the inbox"
        )
        job = _wait_for_job(client)
        print(f"job {job.id} queued; following it (the same stream `loradrop logs -f {job.id}` shows)")

        bar = ProgressLine(sys.stdout)
        final_state = None
        for event in client.events(job.id):
            body = event.WhichOneof("body")
            if body == "progress":
                p = event.progress
                bar.update(
                    "step" if p.stage == "train" else p.stage,
                    p.done,
                    p.total,
                    describe_progress(**figures_of(p)),
                )
            else:
                bar.message(event_line(event))
            if body == "state" and event.state.state in TERMINAL:
                final_state = state_name(event.state.state)
                break
        bar.close()

        artifacts = {a.kind: a for a in client.artifacts(job.id)}
        print()
        print(f"job {job.id}: {final_state} in {time.monotonic() - started:.0f} s")
        if final_state != "done":
            return 1
        final = artifacts["final"].path
        # The job measured each block's effect on its sample prompts (`blocks --suggest --effect`).
        vector = json.loads(Path(artifacts["analysis"].path).read_text())["suggested_vector_90"]
        chopped = client.chop(final, vector)
        montage = root / "montage.webp"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "loradrop",
                "montage",
                job.id,
                "-o",
                str(montage),
                "--connect",
                f"unix:{home / 'daemon.sock'}",
            ],
            check=False,
            stdout=subprocess.DEVNULL,
        )
        for label, path in (
            ("trained LoRA", final),
            ("resized", artifacts["resized"].path),
            (f"chopped {vector}", chopped.path),
        ):
            print(f"  {label:13} {path}  ({Path(path).stat().st_size / 1e6:.2f} MB)")
        samples = sorted((home / "outputs" / job.id / "samples").glob("*.png"))
        print(f"  samples       {len(samples)} PNGs in {samples[0].parent if samples else '(none)'}")
        if montage.exists():
            print(f"  montage       {montage}  (the concept appearing over the steps)")
        print(f"  everything    {home / 'outputs' / job.id}   (remove {root} when done)")
        print(f"judging 'a {CONCEPT.trigger} ...' samples (the concept is {CONCEPT.colour}):")
        scores = concept_scores(
            {
                "without the LoRA": None,
                "with the LoRA": final,
                "resized": artifacts["resized"].path,
                "chopped": chopped.path,
            }
        )
        for label, value in scores.items():
            print(f"  {label:17} {CONCEPT.colour} in {value}")
        return 0
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
