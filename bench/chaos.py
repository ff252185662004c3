"""`make chaos`: jobs trained on a real daemon while its worker, or the whole daemon, is killed
with SIGKILL at random points (now and then the worker is frozen with SIGSTOP instead, which the
daemon's heartbeat must notice, and the daemon is stopped cleanly with SIGTERM, which makes a job
save its state mid-run and resume from there); then the invariants that must hold whatever happened.

    python bench/chaos.py [--ray] [--jobs 12] [--kills 40] [--seed 1] [--steps 10] [--json OUT] [--keep]

With --ray the daemon's workers are Ray actors on Ray's own loopback test cluster of NODES nodes
(loradrop.testing.RayTestCluster), each working in a copy of the home (--ray-transfer always), and
the kills are drawn among: an actor's process (SIGKILL, or SIGSTOP for the heartbeat), a whole
node (its processes killed at once; a fresh node joins in its place), and the daemon (SIGKILL or
SIGTERM, then started again on the same home while the cluster keeps running).

Invariants (each violation is listed; the run fails if there is any):
  - every job ends done or failed; a failed one says why;
  - a done job's final, resized and chopped LoRAs, and every step file it kept, hold the same
    tensors as an uninterrupted run of the same job (run first, on the same daemon);
  - ListArtifacts, asked between kills and at the end, never lists a hidden or partial file, and
    every .safetensors it lists opens and reads whole;
  - no worker outlives its daemon: the workers of a killed or stopped daemon (its children and
    the pids its status reported: with --ray, the actors' processes) are gone within seconds, and
    the daemon started after it has a ready worker on every node within a minute (so Ray freed
    the GPUs the old actors held); a frozen worker is replaced, and its process is gone;
  - the sqlite file passes integrity_check, every job is in a terminal state, each job's events
    are numbered 1..last_seq with no gap and no repeat, and its last state event is its state;
  - a client that followed the global event stream through every kill and restart saw every
    stored event once, in order.

The tests run a short version (tests/reliability/test_chaos.py); the kills are drawn from a
seeded generator (which victim, and how long after a job starts running), so a failing seed can
be run again. Where a kill lands still depends on the machine's speed.

Not checked with --ray: that the nodes' scratch copies of a killed actor's jobs are removed (a
node keeps what a SIGKILLed actor left until its temporary folder is cleaned), nor anything over a
real network: the test cluster's nodes are processes on this machine.
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
from loradrop.testing import (  # noqa: E402
    BUCKET_SIZES,
    TEST_GPU,
    Daemon,
    RayTestCluster,
    make_dataset,
    pid_alive,
    wait_for,
)

VECTOR = "1,0,0,0,0,0,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0"
ENV = {"OMP_NUM_THREADS": "1"}  # tiny steps gain nothing from two threads on a shared 2-core machine
HEARTBEAT = 6  # seconds: the daemon's deadline for a frozen worker in this run
TERMINAL = (pb.DONE, pb.FAILED, pb.CANCELLED)
NODES = 2  # of the Ray test cluster, one worker each
GONE_S = {False: 10, True: 30}  # seconds a dead daemon's workers have to end: Ray kills its actors itself
PLACED_S = 60  # seconds a restarted daemon has to get a ready worker on every node
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
    ray: bool = False
    done: int = 0
    failed: int = 0
    failures: list[str] = field(default_factory=list)
    worker_kills: int = 0
    worker_freezes: int = 0
    node_kills: int = 0
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


@dataclass
class _Target:
    """What the kills aim at: the daemon, and with --ray the cluster its workers run on."""

    d: Daemon
    report: Report
    cluster: RayTestCluster | None
    workers_seen: set[int]  # every worker pid seen, checked gone at the end

    @property
    def capacity(self) -> int:
        return len(self.cluster.nodes) if self.cluster else 1

    def gone(self, pids, what: str) -> None:
        """The violation if any of `pids` still runs after the daemon's deadline for its workers."""
        pids = [p for p in pids if p]
        try:
            wait_for(
                lambda: not any(pid_alive(p) for p in pids), timeout=GONE_S[bool(self.cluster)], what=what
            )
        except AssertionError:
            self.report.violations.append(f"{[p for p in pids if pid_alive(p)]} still run: {what}")

    def restart(self, k: int) -> None:
        """Start the daemon again and wait for a ready worker per node (the old ones let go of them)."""
        self.d.start()
        with self.d.client() as c:
            try:
                wait_for(
                    lambda: sum(w.state in ("idle", "busy") for w in c.status().workers) >= self.capacity,
                    timeout=PLACED_S,
                    what="a ready worker per node",
                )
            except AssertionError:
                ready = sum(w.state in ("idle", "busy") for w in c.status().workers)
                self.report.violations.append(
                    f"the restarted daemon had {ready} of {self.capacity} workers ready after {PLACED_S} s (kill {k + 1})"
                )


def _victims(status) -> list:
    """The workers that have a process, those running a job first."""
    return sorted((w for w in status.workers if w.pid), key=lambda w: w.state != "busy")


def _kill_worker(t: _Target, status, k: int) -> str | None:
    victims = _victims(status)
    if not victims:
        return None
    os.kill(victims[0].pid, signal.SIGKILL)
    t.report.worker_kills += 1
    return f"worker {victims[0].pid}"


def _freeze_worker(t: _Target, status, k: int) -> str | None:
    """Frozen: the daemon must notice by its heartbeat, kill it and resume the job."""
    victims = _victims(status)
    if not victims:
        return None
    pid = victims[0].pid
    os.kill(pid, signal.SIGSTOP)
    t.report.worker_freezes += 1
    with t.d.client() as c:
        try:
            wait_for(
                lambda: all(w.pid != pid for w in c.status().workers),
                timeout=HEARTBEAT + 30,
                what="the frozen worker to be replaced",
            )
        except AssertionError:
            t.report.violations.append(f"the frozen worker {pid} was not replaced (kill {k + 1})")
            os.kill(pid, signal.SIGKILL)
    t.gone([pid], f"the frozen worker after its replacement (kill {k + 1})")
    if pid_alive(pid):
        os.kill(pid, signal.SIGKILL)
    return f"worker {pid} frozen (SIGSTOP)"


def _kill_node(t: _Target, status, k: int) -> str | None:
    """A whole node at once, as when its machine loses power; a fresh one joins in its place."""
    for w in _victims(status):
        try:
            node = t.cluster.node_of(w.node)
        except StopIteration:  # the worker's node is gone already
            continue
        t.cluster.add(*t.cluster.kill(node))
        t.report.node_kills += 1
        return f"node {w.node} (worker {w.pid} {w.state})"
    return None


def _kill_daemon(t: _Target, status, k: int) -> str:
    workers = set(_children(t.d.pid)) | {w.pid for w in status.workers}
    t.workers_seen.update(workers)
    t.d.kill()
    t.report.daemon_kills += 1
    t.gone(workers, f"workers outlived their daemon (kill {k + 1})")
    t.restart(k)
    return "daemon"


def _stop_daemon(t: _Target, status, k: int) -> str:
    """A clean stop: the job saves its state at the next step and resumes from there."""
    workers = set(_children(t.d.pid)) | {w.pid for w in status.workers}
    t.workers_seen.update(workers)
    if t.d.stop(timeout=60) != 0:
        t.report.violations.append(
            f"the daemon exited with {t.d.process.returncode} on SIGTERM (stop {k + 1})"
        )
    t.report.daemon_stops += 1
    t.gone(workers, f"workers outlived their stopped daemon (stop {k + 1})")
    t.restart(k)
    return "daemon stopped with SIGTERM"


# (the draw below which it is chosen, the kill): the local mode's, and the Ray mode's with nodes.
KILLS = {
    False: ((0.45, _kill_worker), (0.55, _freeze_worker), (0.85, _kill_daemon), (1.0, _stop_daemon)),
    True: (
        (0.3, _kill_worker),
        (0.4, _freeze_worker),
        (0.65, _kill_node),
        (0.9, _kill_daemon),
        (1.0, _stop_daemon),
    ),
}


def run_chaos(
    root: Path,
    *,
    jobs: int,
    kills: int,
    seed: int,
    steps: int = 6,
    max_retries: int = 3,
    ray: bool = False,
    log=print,
) -> Report:
    started = time.monotonic()
    rng = random.Random(seed)
    report = Report(seed=seed, jobs=jobs, steps=steps, ray=ray)
    home = root / "home"
    cluster = _ray_cluster(root) if ray else None
    where = (
        ["--ray", cluster.address, "--ray-resource", TEST_GPU, "--ray-transfer", "always"]
        if cluster
        else ["--workers", "1"]
    )
    d = Daemon(
        home,
        "--quiet-seconds",
        "3600",
        *where,
        "--max-retries",
        str(max_retries),
        "--heartbeat-seconds",
        str(HEARTBEAT),
        env=ENV,
    )
    workers_seen: set[int] = set()
    target = _Target(d, report, cluster, workers_seen)
    try:
        d.start()
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
            what = next(kill for below, kill in KILLS[ray] if victim < below)(target, status, k)
            if what is None:
                continue
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
        target.gone(workers_seen, "workers outlived the daemon at the end")
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
        if cluster is not None:
            cluster.shutdown()
            os.environ.pop("LORADROP_RAY_SCRATCH", None)
    report.seconds = round(time.monotonic() - started, 1)
    return report


def _ray_cluster(root: Path) -> RayTestCluster:
    """NODES nodes whose copies of the home go under `root` (the nodes inherit the variable)."""
    os.environ["LORADROP_RAY_SCRATCH"] = str(root / "scratch")
    return RayTestCluster(*[()] * NODES)


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
        help="interruptions: worker SIGKILL or SIGSTOP, daemon SIGKILL or SIGTERM; with --ray, a node too",
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--ray",
        action="store_true",
        help=f"workers as Ray actors on a loopback test cluster of {NODES} nodes",
    )
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
    report = run_chaos(root, jobs=args.jobs, kills=args.kills, seed=args.seed, steps=args.steps, ray=args.ray)
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
