"""The daemon's figures, on a real daemon with the tiny twin:

  idle RSS       of the server process (no torch in it), its worker idle and warm   target < 100 MB
  event latency  from the engine's emit in the worker to a client on the socket, p99 target < 50 ms
  drop → step 1  from a folder's move into the inbox to its first training step,
                 with a warm worker                                                 target quiet + 2 s
  drop → chopped from the same drop to the chopped LoRA on disk (train, resize, blocks, chop:
                 the whole job), beside the time its stages took in the worker

    python bench/daemon_bench.py [--steps 20] [--quiet 1.0] [--keep]

On a small CPU shared with other work, OMP_NUM_THREADS=1 (passed on to the worker) keeps the
tiny steps from stalling; the figures it prints do not depend on the step time.

Latency uses each event's time, which the worker stamps when the engine emits it; the client
stamps its arrival (same machine, same clock). The client follows the daemon's whole stream from
before the drop, so no event is read late from the backlog (which a stream opened once the job
is known would do, and which earlier versions of this bench counted as 30-40 ms of latency).
"""

from __future__ import annotations

import argparse
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.rows import row, write_rows  # noqa: E402
from loradrop.proto.client import Client, ClientError
from loradrop.proto.v1 import loradrop_pb2 as pb

RECIPE = """resolution = 64
min_bucket_reso = 64
max_bucket_reso = 128
bucket_reso_steps = 32
train_batch_size = 1
gradient_accumulation_steps = 1
max_train_steps = {steps}
sample_every_n_steps = 0
log_with = "none"
mixed_precision = "no"
gradient_checkpointing = false
max_data_loader_n_workers = 0
"""


VECTOR = "1,0,0,0,0,0,0,0,1,1,0,0,0,1,1,1,0,0,0,0,0"  # chop to a few blocks, as the guide ends


def dataset(folder: Path, steps: int) -> Path:
    folder.mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (64, 64), (50 * i, 100, 150)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a photo of a thing, {i}")
    (folder / "loradrop.toml").write_text(RECIPE.format(steps=steps) + f'block_vector = "{VECTOR}"\n')
    return folder


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {what}")


def run_job(client: Client, inbox: Path, source: Path, name: str) -> dict:
    """Drop `source` into the inbox and follow its job to the end: seconds to the first training
    step and to the chopped LoRA, the worker's time in the stages, [(event latency, kind)].

    The daemon's whole stream is followed from before the drop, so every event of the job is
    seen live (a stream opened once the job is known would get its first events late, from
    the backlog)."""
    before = {j.id for j in client.jobs()}
    since = client.status().last_event_seq
    start = time.time()
    shutil.move(source, inbox / name)
    job_id = first_step = chopped = stage_start = last = None
    latencies = []
    for event in client.events("", since=since, follow=True):
        arrived = time.time()
        if job_id is None and event.job_id and event.job_id not in before:
            job_id = event.job_id
        if event.job_id != job_id or job_id is None:
            continue
        if event.HasField("progress") or event.HasField("log") or event.HasField("stage"):
            latencies.append((arrived - event.time, event.kind))
        if event.HasField("stage") and stage_start is None:
            stage_start = event.time
        if first_step is None and event.HasField("progress") and event.progress.stage == "train":
            first_step = arrived - start
        if event.HasField("artifact") and event.artifact.kind == "chopped":
            chopped, last = arrived - start, event.time
        if event.HasField("state") and event.state.state in (pb.DONE, pb.FAILED, pb.CANCELLED):
            break
    job = client.job(job_id)
    if job.state != pb.DONE or chopped is None:
        raise SystemExit(
            f"job {job_id} ended {job.state} ({'a chopped LoRA' if chopped else 'no chopped LoRA'}): {job.error}"
        )
    return {
        "first_step": first_step,
        "chopped": chopped,
        "stages": last - stage_start,
        "latencies": latencies,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=20,
        help="training steps of the measured job (more steps, more latency samples)",
    )
    parser.add_argument("--quiet", type=float, default=1.0, help="the daemon's --quiet-seconds")
    parser.add_argument("--keep", action="store_true", help="keep the temporary home")
    parser.add_argument("--json", type=Path, help="also write the result rows as JSON here")
    args = parser.parse_args()

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the daemon below is stopped too
    root = Path(tempfile.mkdtemp(prefix="ld-bench-", dir="/tmp"))
    home = root / "home"
    daemon = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "loradrop",
            "daemon",
            "--home",
            str(home),
            "--workers",
            "1",
            "--quiet-seconds",
            str(args.quiet),
        ],
        stdout=open(root / "daemon.out", "wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        client = Client(f"unix:{home / 'daemon.sock'}")
        wait(lambda: _answers(client), 60, "the daemon")
        wait(lambda: client.status().workers[0].state == "idle", 120, "the worker to load")
        time.sleep(2)
        idle_cold = rss_mb(daemon.pid)

        # The first job loads the model into the worker; the second starts hot, as the design promises.
        run_job(client, home / "inbox", dataset(root / "warmup", 2), "warmup")
        measured = run_job(client, home / "inbox", dataset(root / "measured", args.steps), "measured")
        first_step, latencies = measured["first_step"], measured["latencies"]
        time.sleep(2)
        idle_warm = rss_mb(daemon.pid)
        worker = client.status().workers[0]
        worker_rss = rss_mb(worker.pid)
        torch_in_server = "libtorch" in Path(f"/proc/{daemon.pid}/maps").read_text()

        latencies_ms = sorted(1000 * x for x, _ in latencies)
        p99 = latencies_ms[min(len(latencies_ms) - 1, int(0.99 * len(latencies_ms)))]
        slowest = max(latencies)[1]
        print(
            f"idle RSS, server process     {idle_cold:7.1f} MB before any job, {idle_warm:7.1f} MB after two   (target < 100 MB; torch loaded: {torch_in_server})"
        )
        print(f"idle RSS, worker (for scale) {worker_rss:7.1f} MB")
        print(
            f"event latency worker→client  p50 {statistics.median(latencies_ms):.2f} ms, p99 {p99:.2f} ms, max {latencies_ms[-1]:.2f} ms (a {slowest} event) over {len(latencies_ms)} events (target p99 < 50 ms)"
        )
        print(
            f"drop → first training step   {first_step:.2f} s with quiet {args.quiet:g} s: quiet + {first_step - args.quiet:.2f} s (target quiet + 2 s)"
        )
        print(
            f"drop → chopped LoRA          {measured['chopped']:.2f} s ({args.steps} steps, resize, blocks, chop); "
            f"the worker's stages {measured['stages']:.2f} s of it, quiet {args.quiet:g} s"
        )
        write_rows(
            [
                row(
                    "daemon idle RSS, server (after two jobs)",
                    idle_warm,
                    "MB",
                    "< 100 MB",
                    worker_rss,
                    "the worker, for scale",
                ),
                row(
                    "event latency worker → client, p99",
                    p99,
                    "ms",
                    "< 50 ms",
                    statistics.median(latencies_ms),
                    "p50",
                ),
                row(
                    "drop → first training step, beyond quiet",
                    first_step - args.quiet,
                    "s",
                    "≤ 2 s (warm model)",
                ),
                row(
                    f"drop → chopped LoRA ({args.steps} tiny steps), beyond quiet",
                    measured["chopped"] - args.quiet,
                    "s",
                    "-",
                    measured["stages"],
                    "the worker's stages",
                ),
            ],
            args.json,
        )
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"kept {root}")
    return 0


def _answers(client: Client) -> bool:
    try:
        client.status()
        return True
    except ClientError:
        return False


if __name__ == "__main__":
    sys.exit(main())
