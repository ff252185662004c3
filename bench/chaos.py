"""`make chaos`: jobs trained on a real daemon while its worker, or the whole daemon, is killed
with SIGKILL at random points (now and then the worker is frozen with SIGSTOP instead, which the
daemon's heartbeat must notice, and the daemon is stopped cleanly with SIGTERM, which makes a job
save its state mid-run and resume from there); then the invariants that must hold whatever happened.

    python bench/chaos.py [--jobs 12] [--kills 40] [--seed 1] [--steps 10] [--json OUT] [--keep]

Invariants (each violation is listed; the run fails if there is any):
  - every job ends done or failed; a failed one says why;
  - a done job's final, resized and chopped LoRAs, and every step file it kept, hold the same
    tensors as an uninterrupted run of the same job (run first, on the same daemon);
  - ListArtifacts, asked between kills and at the end, never lists a hidden or partial file, and
    every .safetensors it lists opens and reads whole;
  - no worker outlives its daemon (each killed daemon's children are gone within seconds);
  - the sqlite file passes integrity_check, every job is in a terminal state, each job's events
    are numbered 1..last_seq with no gap and no repeat, and its last state event is its state;
  - a client that followed the global event stream through every kill and restart saw every
    stored event once, in order.

The tests run a short version (tests/reliability/test_chaos.py); the kills are drawn from a
seeded generator (which victim, and how long after a job starts running), so a failing seed can
be run again. Where a kill lands still depends on the machine's speed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sqlite3
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from loradrop.proto.client import Client, ClientError  # noqa: E402
from loradrop.proto.v1 import loradrop_pb2 as pb  # noqa: E402
from loradrop.testing import BUCKET_SIZES, Daemon, make_dataset, pid_alive, wait_for  # noqa: E402

VECTOR = "1,0,0,0,0,0,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0"
ENV = {"OMP_NUM_THREADS": "1"}  # tiny steps gain nothing from two threads on a shared 2-core machine
HEARTBEAT = 6  # seconds: the daemon's deadline for a frozen worker in this run
TERMINAL = (pb.DONE, pb.FAILED, pb.CANCELLED)
# Two kinds of job, so a mix-up between jobs would show: different data, seed and bucket layout.
VARIANTS = (
    {"images": 2, "sizes": None, "settings": {"seed": 7}},
    {"images": 3, "sizes": BUCKET_SIZES, "settings": {"seed": 11, "shuffle_caption": True}},
)


@dataclass
class Report:
    seed: int
    jobs: int
    steps: int
    done: int = 0
    failed: int = 0
    failures: list[str] = field(default_factory=list)
    worker_kills: int = 0
    worker_freezes: int = 0
    daemon_kills: int = 0
    daemon_stops: int = 0
    kills_while_training: int = 0
    compared_files: int = 0
    listing_checks: int = 0
    listed_files: int = 0
    leftover_partials: int = 0
    events_stored: int = 0
    events_followed: int = 0
    workers_seen: int = 0
    seconds: float = 0.0
    violations: list[str] = field(default_factory=list)


class _Follower:
    """A client following the global event stream from `since`, through daemon restarts."""

    def __init__(self, client: Client, since: int):
        self.client, self.seen = client, []
        self.thread = threading.Thread(target=self._run, args=(since,), daemon=True)
        self.thread.start()

    def _run(self, since: int) -> None:
        try:
            for event in self.client.events(since=since, follow=True):
                self.seen.append(event.global_seq)
        except Exception:  # closed at the end of the run
            pass


def run_chaos(
    root: Path, *, jobs: int, kills: int, seed: int, steps: int = 6, max_retries: int = 3, log=print
) -> Report:
    started = time.monotonic()
    rng = random.Random(seed)
    report = Report(seed=seed, jobs=jobs, steps=steps)
    home = root / "home"
    d = Daemon(
        home,
        "--quiet-seconds",
        "3600",
        "--workers",
        "1",
        "--max-retries",
        str(max_retries),
        "--heartbeat-seconds",
        str(HEARTBEAT),
        env=ENV,
    ).start()
    workers_seen: set[int] = set()
    try:
        with d.client() as c:
            for v, variant in enumerate(VARIANTS):
                make_dataset(
                    home / "inbox" / f"v{v}",
                    images=variant["images"],
                    sizes=variant["sizes"],
                    settings={"max_train_steps": steps, "block_vector": VECTOR, **variant["settings"]},
                )
            # Uninterrupted runs first: what every chaos job of the same variant must end with.
            refs = [c.submit(f"v{v}", name=f"ref{v}") for v in range(len(VARIANTS))]
            refs = [_wait_end(c, r.id, 300) for r in refs]
            for r in refs:
                if r.state != pb.DONE:
                    raise RuntimeError(
                        f"the reference job {r.id} ended {pb.JobState.Name(r.state)}: {r.error}"
                    )
            since = c.status().last_event_seq
            chaos_jobs = [c.submit(f"v{i % len(VARIANTS)}", name=f"chaos{i}").id for i in range(jobs)]
        log(f"chaos: references done; {jobs} jobs queued, {kills} kills to come (seed {seed})")
        follower = _Follower(d.client(), since)

        for k in range(kills):
            with d.client() as c:
                running = _wait_running(c, chaos_jobs)
                if running is None:
                    break  # every job ended before the kills ran out
                time.sleep(rng.uniform(0.0, 4.0))
                report.listing_checks += 1
                report.listed_files += _check_listings(c, chaos_jobs, report.violations)
                status = c.status()
                workers_seen.update(w.pid for w in status.workers if w.pid)
                training = any(w.state == "busy" for w in status.workers)
            victim = rng.random()
            if victim < 0.45:
                pids = [w.pid for w in status.workers if w.pid]
                if not pids:
                    continue
                os.kill(pids[0], signal.SIGKILL)
                report.worker_kills += 1
                what = f"worker {pids[0]}"
            elif victim < 0.55:  # frozen: the daemon must notice by its heartbeat, kill it and resume the job
                pids = [w.pid for w in status.workers if w.pid]
                if not pids:
                    continue
                os.kill(pids[0], signal.SIGSTOP)
                report.worker_freezes += 1
                with d.client() as c:
                    try:
                        wait_for(
                            lambda: all(w.pid != pids[0] for w in c.status().workers),
                            timeout=HEARTBEAT + 30,
                            what="the frozen worker to be replaced",
                        )
                    except AssertionError:
                        report.violations.append(
                            f"the frozen worker {pids[0]} was not replaced (kill {k + 1})"
                        )
                        os.kill(pids[0], signal.SIGKILL)
                what = f"worker {pids[0]} frozen (SIGSTOP)"
            elif victim < 0.85:
                children = _children(d.pid)
                workers_seen.update(children)
                d.kill()
                report.daemon_kills += 1
                try:
                    wait_for(
                        lambda: not any(pid_alive(p) for p in children),
                        timeout=10,
                        what="the killed daemon's workers to exit",
                    )
                except AssertionError:
                    report.violations.append(
                        f"workers {[p for p in children if pid_alive(p)]} outlived their daemon (kill {k + 1})"
                    )
                d.start()
                what = "daemon"
            else:  # a clean stop: the job saves its state at the next step and resumes from there
                workers_seen.update(_children(d.pid))
                if d.stop(timeout=60) != 0:
                    report.violations.append(
                        f"the daemon exited with {d.process.returncode} on SIGTERM (stop {k + 1})"
                    )
                report.daemon_stops += 1
                d.start()
                what = "daemon stopped with SIGTERM"
            report.kills_while_training += training
            log(f"chaos: kill {k + 1}/{kills}: {what}{' (a job was running)' if training else ''}")

        with d.client() as c:
            ended = [_wait_end(c, j, 600) for j in chaos_jobs]
            report.listing_checks += 1
            report.listed_files += _check_listings(c, chaos_jobs + [r.id for r in refs], report.violations)
            top = c.status().last_event_seq
            workers_seen.update(w.pid for w in c.status().workers if w.pid)
        try:
            wait_for(
                lambda: follower.seen and follower.seen[-1] >= top,
                timeout=30,
                what="the follower to catch up",
            )
        except AssertionError:
            pass  # judged below, against the database
        followed = [g for g in follower.seen if g <= top]
        follower.client.close()

        children = _children(d.pid)
        workers_seen.update(children)
        if d.stop(timeout=60) != 0:
            report.violations.append(f"the daemon exited with {d.process.returncode} on SIGTERM")
        try:
            wait_for(
                lambda: not any(pid_alive(p) for p in workers_seen), timeout=10, what="every worker to exit"
            )
        except AssertionError:
            report.violations.append(
                f"processes {[p for p in workers_seen if pid_alive(p)]} outlived the daemon"
            )
        report.workers_seen = len(workers_seen)

        for job in ended:
            if job.state == pb.DONE:
                report.done += 1
                report.compared_files += _compare(
                    job, refs[int(job.name.removeprefix("chaos")) % len(VARIANTS)], report.violations
                )
            elif job.state == pb.FAILED:
                report.failed += 1
                report.failures.append(f"{job.id}: {job.error}")
                if not job.error:
                    report.violations.append(f"{job.id} failed without a reason")
            else:
                report.violations.append(f"{job.id} ended {pb.JobState.Name(job.state)}, not done or failed")
        stored = _check_database(home / "state.sqlite", report.violations)
        report.events_stored = len(stored)
        expected = [g for g in stored if since < g <= top]
        report.events_followed = len(followed)
        if followed != expected:
            missing, extra = sorted(set(expected) - set(followed)), len(followed) - len(set(followed))
            report.violations.append(
                f"the follower saw {len(followed)} events, the store holds {len(expected)} "
                f"(missing {missing[:10]}, repeated {extra}, in order: {followed == sorted(followed)})"
            )
        report.leftover_partials = sum(1 for p in (home / "outputs").rglob("*.partial"))
    finally:
        if d.process and d.process.poll() is None:
            d.kill()
    report.seconds = round(time.monotonic() - started, 1)
    return report


def _wait_end(c: Client, job_id: str, timeout: float) -> pb.Job:
    return wait_for(
        lambda: (j := c.job(job_id)).state in TERMINAL and j,
        timeout=timeout,
        interval=0.2,
        what=f"job {job_id} to end",
    )


def _wait_running(c: Client, job_ids: list[str], timeout: float = 120) -> str | None:
    """A job of `job_ids` that runs now; None once all of them have ended."""

    def look():
        states = {j.id: j.state for j in c.jobs() if j.id in job_ids}
        if all(s in TERMINAL for s in states.values()):
            return "all ended"
        return next((i for i, s in states.items() if s == pb.RUNNING), None)

    found = wait_for(look, timeout=timeout, interval=0.1, what="a job to run")
    return None if found == "all ended" else found


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def _check_listings(c: Client, job_ids: list[str], violations: list[str]) -> int:
    """Every file ListArtifacts names is whole: no hidden or partial name, safetensors that open."""
    from loradrop.engine.tensorfile import TensorFile

    listed = 0
    for job_id in job_ids:
        try:
            artifacts = c.artifacts(job_id)
        except ClientError as e:
            violations.append(f"ListArtifacts({job_id}) failed: {e}")
            continue
        for a in artifacts:
            listed += 1
            name = Path(a.path).name
            if name.startswith(".") or ".partial" in name or ".tmp" in name:
                violations.append(f"ListArtifacts({job_id}) lists the temporary file {a.path}")
            if name.endswith(".safetensors"):
                try:
                    with TensorFile(a.path) as f:
                        f.read_all()
                except Exception as e:  # any failure to read it is the violation
                    violations.append(f"listed artifact {a.path} does not open: {e}")
    return listed


def _tensors(path: str) -> dict:
    from loradrop.engine.tensorfile import TensorFile

    with TensorFile(path) as f:
        return f.read_all()


def _compare(job: pb.Job, ref: pb.Job, violations: list[str]) -> int:
    """The job's LoRAs against the uninterrupted run's: the same tensors, bit for bit."""
    pairs = [(job.final, ref.final), (job.resized, ref.resized), (job.chopped, ref.chopped)]
    ref_steps = {p.name.rsplit("-step", 1)[1]: p for p in Path(ref.out_dir).glob("*-step*.safetensors")}
    for step_file in Path(job.out_dir).glob("*-step*.safetensors"):
        pairs.append((str(step_file), str(ref_steps.get(step_file.name.rsplit("-step", 1)[1], ""))))
    for mine, theirs in pairs:
        if not mine or not theirs or not Path(theirs).is_file():
            violations.append(f"{job.id}: {mine or 'a file'} has no counterpart {theirs or ''} in {ref.id}")
            continue
        a, b = _tensors(mine), _tensors(theirs)
        differ = [
            k
            for k in a.keys() | b.keys()
            if k not in a or k not in b or a[k].dtype != b[k].dtype or not bool((a[k] == b[k]).all())
        ]
        if differ:
            violations.append(
                f"{job.id}: {Path(mine).name} differs from {Path(theirs).name} in {len(differ)} tensors, e.g. {differ[:2]}"
            )
    return len(pairs)


def _check_database(path: Path, violations: list[str]) -> list[int]:
    """The stopped daemon's sqlite file: whole, every job ended, each job's events without gaps;
    returns every stored global event number."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        check = db.execute("PRAGMA integrity_check").fetchall()
        if check != [("ok",)]:
            violations.append(f"integrity_check: {check[:5]}")
        for job_id, state, last_seq in db.execute("SELECT id, state, last_seq FROM jobs"):
            if state not in ("done", "failed", "cancelled"):
                violations.append(f"{job_id} is {state} in the database after the run")
            seqs = [
                s for (s,) in db.execute("SELECT seq FROM events WHERE job_id = ? ORDER BY gseq", (job_id,))
            ]
            if seqs != list(range(1, last_seq + 1)):
                violations.append(f"{job_id}: event numbers {seqs[:5]}... are not 1..{last_seq} in order")
            last = db.execute(
                "SELECT payload FROM events WHERE job_id = ? AND kind = 'state' ORDER BY seq DESC LIMIT 1",
                (job_id,),
            ).fetchone()
            if last is None or json.loads(last[0])["state"] != state:
                violations.append(f"{job_id}: its last state event {last} does not say {state}")
        gseqs = [g for (g,) in db.execute("SELECT gseq FROM events ORDER BY gseq")]
        daemon_seqs = db.execute("SELECT COUNT(*) FROM events WHERE job_id = '' AND seq != gseq").fetchone()[
            0
        ]
        if daemon_seqs:
            violations.append(f"{daemon_seqs} daemon events have seq != gseq")
        return gseqs
    finally:
        db.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=12)
    p.add_argument(
        "--kills",
        type=int,
        default=40,
        help="interruptions: worker SIGKILL or SIGSTOP, daemon SIGKILL, or daemon SIGTERM",
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--steps", type=int, default=10, help="training steps per job")
    p.add_argument("--json", type=Path, help="write the report here")
    p.add_argument("--keep", action="store_true", help="keep the daemon's home for a look")
    args = p.parse_args()
    root = Path(
        tempfile.mkdtemp(prefix="ldc-", dir="/tmp")
    )  # short: the socket path must stay under ~100 characters
    os.environ.setdefault(
        "XDG_CACHE_HOME", str(root / "cache")
    )  # the tiny twin and hashes, removed with the run
    report = run_chaos(root, jobs=args.jobs, kills=args.kills, seed=args.seed, steps=args.steps)
    text = json.dumps(asdict(report), indent=1)
    print(text)
    if args.json:
        args.json.write_text(text)
    if args.keep:
        print(f"home kept: {root / 'home'}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if report.violations else 0


if __name__ == "__main__":
    sys.exit(main())
