"""A Ray worker against a local one, on Ray's own loopback test cluster (loradrop.testing):

  overhead   drop → chopped of the same tiny job (train, resize, blocks, chop), on a daemon with
             one local worker and on a daemon whose one worker is a Ray actor on a one-node
             cluster, working in a copy of the home as on a machine that cannot see its disk
             (--ray-transfer always). The first job pays the worker's start (and, for Ray, the
             base model's trip to the node); the second finds the worker warm.
  transfer   the chunked path of daemon/ray_slot.py itself, driven from this process as the
             daemon drives it: MB/s pushing random files of three sizes to a node's copy
             (RayWorker.push), the time to find the whole folder already held there, and MB/s
             back (files completed under the copy's outputs, as a job's checkpoints come back
             through the actor's stream).

    python bench/ray_bench.py [--steps 6] [--mib 256] [--json OUT] [--keep]

Everything runs on this machine, so the "network" is loopback: the transfer figures are the
path's own cost (chunking, serialization, Ray's object store), a ceiling for a real network.
The baseline of each transfer row is a plain copy of the same files on the same disk.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.daemon_bench import run_job  # noqa: E402
from bench.rows import row, write_rows  # noqa: E402
from loradrop.testing import TEST_GPU, Daemon, RayTestCluster, make_dataset, wait_for  # noqa: E402

VECTOR = "1,0,0,0,0,0,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0"  # chops: the job's whole chain runs
ENV = {"OMP_NUM_THREADS": "1"}
MIB = 1 << 20
# (name, size of one file, share of the folder): one large file, chunk-sized ones, small ones.
SIZES = (("large", None, 0.5), ("4 MiB", 4 * MIB, 0.25), ("64 KiB", 64 << 10, 0.25))


@dataclass
class Drops:
    """Seconds from a folder's move into the inbox to its chopped LoRA, for two jobs in a row."""

    first: float
    second: float


def drop_two(daemon: Daemon, root: Path, steps: int) -> Drops:
    """Start `daemon`, drop two jobs one after the other (the first as soon as it answers)."""
    daemon.start()
    try:
        with daemon.client() as c:
            times = []
            for name in ("first", "second"):
                source = make_dataset(
                    root / f"{daemon.home.name}-{name}",
                    settings={"max_train_steps": steps, "block_vector": VECTOR},
                )
                times.append(run_job(c, daemon.home / "inbox", source, name)["chopped"])
        return Drops(*times)
    except BaseException:
        print(daemon.log()[-5000:])
        raise
    finally:
        daemon.stop()


@dataclass
class Transfer:
    push: list[tuple[str, float, float]]  # (files, MB/s, a plain copy's MB/s)
    skip: float  # seconds to find the whole folder held already
    push_all: float  # seconds the pushes took together
    pull: float  # MB/s of the whole folder back
    copy_all: float  # MB/s of a plain copy of the whole folder
    mb: float


def random_folder(folder: Path, mib: int) -> dict[str, list[Path]]:
    """Random (incompressible) files under `folder`, by size class."""
    classes = {}
    for name, size, share in SIZES:
        total = int(mib * MIB * share)
        size = size or total
        files = []
        for i in range(total // size):
            path = folder / name.replace(" ", "") / f"f{i:04d}.bin"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(os.urandom(size))
            files.append(path)
        classes[name] = files
    return classes


def copy_rate(source: Path, target: Path) -> float:
    """MB/s of a plain copy of `source` on the same disk, synced: the baseline."""
    start = time.perf_counter()
    shutil.copytree(source, target)
    os.sync()
    return _bytes(source) / 1e6 / (time.perf_counter() - start)


def _bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def measure_transfer(cluster: RayTestCluster, root: Path, scratch: Path, mib: int) -> Transfer:
    """One actor placed by the daemon's own code (RayCluster.launch), pushed to and pulled from."""
    from loradrop.daemon import worker
    from loradrop.daemon.config import DaemonConfig, Listen
    from loradrop.daemon.file_mirror import files_under
    from loradrop.daemon.home import Home
    from loradrop.daemon.pipe import Ready
    from loradrop.daemon.ray_slot import RayCluster

    home = Home(root / "transfer-home").create()
    config = DaemonConfig(
        home,
        Listen(unix=home.socket),
        ray=cluster.address,
        ray_resource=TEST_GPU,
        ray_transfer="always",
    )
    classes = random_folder(home.root / "data", mib)
    everything = [p for files in classes.values() for p in files]
    before = set(scratch.iterdir()) if scratch.exists() else set()
    ray_cluster = RayCluster(config, home)
    w = None
    try:
        w = ray_cluster.launch(worker.TOOL, TEST_GPU, "bench")  # a tool worker: no model to load
        # Placed once the node's GPU is free: the daemon before this one has let its actor go.
        wait_for(
            lambda: any(isinstance(m, Ready) for m in _said(w)), timeout=120, interval=0, what="the actor"
        )
        (copy,) = set(scratch.iterdir()) - before  # the node's copy of the home

        push, push_all = [], 0.0
        for name, files in classes.items():
            start = time.perf_counter()
            sent = w.push(files)
            seconds = time.perf_counter() - start
            push_all += seconds
            assert sent == sum(p.stat().st_size for p in files), f"pushed {sent} bytes of {name}"
            folder = files[0].parent
            push.append(
                (f"{len(files)} × {name}", sent / 1e6 / seconds, copy_rate(folder, root / "copy" / name))
            )
        start = time.perf_counter()
        sent = w.push(everything)
        skip = time.perf_counter() - start
        assert sent == 0, f"the second push sent {sent} bytes"

        # Back: the folder completed under the copy's outputs at once (a rename), as a job's files are.
        staged, back = copy / "staged", home.outputs / "pulled"
        shutil.copytree(home.root / "data", staged)
        (copy / "outputs").mkdir(exist_ok=True)

        def all_back() -> bool:
            _said(w)
            return back.is_dir() and len(files_under(back, back)) == len(everything)

        start = time.perf_counter()
        os.rename(staged, copy / "outputs" / "pulled")
        wait_for(all_back, timeout=600, interval=0.05, what="the files to come back")
        pull = _bytes(back) / 1e6 / (time.perf_counter() - start)
        copy_all = copy_rate(home.root / "data", root / "copy-all")
        return Transfer(push, skip, push_all, pull, copy_all, _bytes(home.root / "data") / 1e6)
    finally:
        if w is not None:
            w.kill()
        ray_cluster.shutdown()


def _said(w) -> list:
    """What the actor said since last asked. Read even when unused: its beats would fill the pipe
    and hold up the thread that also takes the files coming back."""
    if not w.is_alive():
        raise SystemExit(f"the Ray worker {w.ended()}")
    said = []
    while w.conn.poll(0.05):
        said.append(w.conn.recv())
    return said


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=6, help="training steps of each tiny job")
    parser.add_argument("--quiet", type=float, default=0.5, help="the daemons' --quiet-seconds")
    parser.add_argument("--mib", type=int, default=256, help="size of the folder sent to the node")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--json", type=Path, help="also write the result rows as JSON here")
    args = parser.parse_args()

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the daemons and the cluster stop too
    root = Path(tempfile.mkdtemp(prefix="ldrb-", dir="/tmp"))  # short: the socket paths
    scratch = root / "scratch"
    quiet = ("--quiet-seconds", str(args.quiet))
    # Each daemon (and, for Ray, the node) gets a cache of its own: both first jobs start cold.
    local = drop_two(
        Daemon(
            root / "local", "--workers", "1", *quiet, env={**ENV, "XDG_CACHE_HOME": str(root / "cache-local")}
        ),
        root,
        args.steps,
    )
    os.environ.update(ENV, XDG_CACHE_HOME=str(root / "cache-ray"), LORADROP_RAY_SCRATCH=str(scratch))
    cluster = RayTestCluster(())
    try:
        remote = drop_two(
            Daemon(
                root / "ray",
                "--ray",
                cluster.address,
                "--ray-resource",
                TEST_GPU,
                "--ray-transfer",
                "always",
                *quiet,
                env=ENV,
            ),  # fmt: skip
            root,
            args.steps,
        )
        transfer = measure_transfer(cluster, root, scratch, args.mib)
    finally:
        cluster.shutdown()
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    print(
        f"drop → chopped ({args.steps} tiny steps, quiet {args.quiet:g} s)   local worker   Ray actor   Ray / local"
    )
    for what, a, b in (
        ("first job (the worker starts)", local.first, remote.first),
        ("second job (warm)", local.second, remote.second),
    ):
        print(f"  {what:38} {a:9.2f} s {b:9.2f} s {b / a:9.2f}×")
    print(f"transfer to a node's copy ({transfer.mb:.0f} MB of random files)   through Ray   plain copy")
    for files, rate, base in transfer.push:
        print(f"  push {files:38} {rate:8.0f} MB/s {base:8.0f} MB/s")
    print(f"  push again, all held: {transfer.skip:.3f} s (sending took {transfer.push_all:.2f} s)")
    print(f"  back from the copy's outputs          {transfer.pull:8.0f} MB/s {transfer.copy_all:8.0f} MB/s")

    rows = []
    for what, a, b in (("first job", local.first, remote.first), ("second job", local.second, remote.second)):
        rows += [
            row(f"drop → chopped, Ray actor, {what}", b, "s", "-", a, "a local worker"),
            row(f"drop → chopped, Ray / local, {what}", b / a, "×", "-"),
        ]
    for files, rate, base in transfer.push:
        rows.append(row(f"push to a node's copy, {files}", rate, "MB/s", "-", base, "a plain copy"))
    rows += [
        row("push again, the whole folder held", transfer.skip, "s", "-", transfer.push_all, "sending it"),
        row("back from a node's outputs", transfer.pull, "MB/s", "-", transfer.copy_all, "a plain copy"),
    ]
    write_rows(rows, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
