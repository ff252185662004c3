"""Worker processes: spawned, answering over their pipe, never outliving the daemon, and the
server process itself free of torch."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from loradrop.daemon.supervisor import visible_devices
from loradrop.daemon.worker_slot import describe_exit
from loradrop.engine.events import Progress
from loradrop.proto.client import ClientError
from loradrop.testing import dead_pid, make_dataset, pid_alive, wait_for

pytestmark = pytest.mark.timeout(120)


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def test_the_tool_worker_answers_and_dies_with_the_daemon(home, daemons):
    d = daemons(home, "--workers", "0", "--quiet-seconds", "60")
    make_dataset(home / "inbox" / "cats")
    with d.client() as c:
        job = c.submit("cats")
        broken = home / "outputs" / job.id / "broken.safetensors"
        broken.parent.mkdir(parents=True)
        broken.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{bad json")
        with pytest.raises(ClientError) as e:
            c.block_layout(str(broken))  # runs in the tool worker, which imports torch
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "broken.safetensors" in str(e.value), str(
            e.value
        )
        workers = _children(d.pid)
        assert workers, "the tool worker should be a child of the daemon"
    assert "libtorch" not in Path(f"/proc/{d.pid}/maps").read_text(), "the server process loaded torch"
    assert any("libtorch" in Path(f"/proc/{p}/maps").read_text() for p in workers if pid_alive(p))
    d.kill()
    wait_for(
        lambda: not any(pid_alive(p) for p in workers), timeout=10, what="the workers to die with the daemon"
    )


def test_sigterm_stops_the_daemon_and_its_workers_cleanly(home, daemons):
    d = daemons(home, "--workers", "0", "--quiet-seconds", "60")
    make_dataset(home / "inbox" / "cats")
    with d.client() as c:
        job = c.submit("cats")
        lora = home / "outputs" / job.id / "x.safetensors"
        lora.parent.mkdir(parents=True)
        lora.write_bytes(b"not a safetensors file at all")
        with pytest.raises(ClientError):
            c.chop(str(lora), "1,0")
        workers = _children(d.pid)
    assert d.stop(timeout=30) == 0
    # The workers and multiprocessing's resource tracker see the daemon's pipes close and exit.
    wait_for(lambda: not any(pid_alive(p) for p in workers), timeout=10, what="the daemon's children to exit")
    assert not (home / "daemon.sock").exists()


def test_devices_come_from_the_environment_without_torch(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,3")
    assert visible_devices() == ["cuda:0", "cuda:1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_devices() == ["cpu"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert visible_devices() == ["cpu"]


def test_exit_reasons_read_as_sentences():
    assert describe_exit(-9) == "was killed by SIGKILL (out of memory, or killed)"
    assert describe_exit(-11) == "was killed by SIGSEGV (a crash in native code)"
    assert describe_exit(3) == "exited with code 3"


def test_progress_is_coalesced_but_never_its_first_or_last():
    from loradrop.daemon.worker import ProgressCoalescer

    c = ProgressCoalescer(interval=0.05)
    kept = [
        p.done
        for i, p in enumerate(Progress("resize", d, 100) for d in range(1, 101))
        if c.keep(p, 1000 + i * 0.001)
    ]
    assert kept[0] == 1 and kept[-1] == 100 and len(kept) == 3  # t=0, t=0.05, and the last
    assert c.keep(Progress("train", 1, 80), 1000.101)  # a new stage always passes
    assert c.keep(Progress("train", 2, 80), 1000.2)  # slow steps all pass


def test_half_written_files_of_dead_workers_are_swept_at_start(home, daemons):
    job_dir = home / "outputs" / "0007-old"
    job_dir.mkdir(parents=True)
    left = job_dir / f".old.safetensors.{dead_pid()}.x1y2.partial"
    left.write_bytes(b"half a file")
    kept = job_dir / "old.safetensors"
    kept.write_bytes(b"whole")
    d = daemons(home, "--workers", "0")
    with d.client() as c:
        c.status()
    assert not left.exists() and kept.exists()
