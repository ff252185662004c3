"""Load: 100 jobs queued at once and 50 clients streaming every event while the first jobs really
train and the rest are cancelled. Each client sees every event, once, in order; the server's
memory stays bounded; and a client past the daemon's stream limit is told so at once, while
plain calls keep being answered."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import pytest

from loradrop.proto.client import ClientError
from loradrop.proto.v1 import loradrop_pb2 as pb
from loradrop.proto.v1 import loradrop_pb2_grpc as rpc
from loradrop.testing import make_dataset, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
JOBS, CLIENTS, TRAINED = 100, 50, 3
RSS_LIMIT_MB = 250  # the server process (no torch in it): about 50 MB idle


def _rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field} for {pid}")


def test_a_hundred_jobs_and_fifty_streaming_clients(home, daemons):
    d = daemons(home, "--workers", "1", "--quiet-seconds", "3600", env={"OMP_NUM_THREADS": "1"})
    make_dataset(
        home / "inbox" / "cats", settings={"max_train_steps": 2, "save_every_n_steps": 1, "resize_recipe": ""}
    )
    idle_mb = _rss_mb(d.pid)
    seen: list[list[tuple[int, str, int]]] = [[] for _ in range(CLIENTS)]
    channels = [
        grpc.insecure_channel(d.connect) for _ in range(CLIENTS)
    ]  # a connection each, as separate clients have
    streams = [rpc.LoradropStub(ch).StreamEvents(pb.StreamEventsRequest(follow=True)) for ch in channels]

    def follow(stream, out):
        try:
            for e in stream:
                out.append((e.global_seq, e.job_id, e.seq))
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.CANCELLED, e  # cancelled at the end of the test

    followers = [
        threading.Thread(target=follow, args=(stream, out), daemon=True) for stream, out in zip(streams, seen)
    ]
    for f in followers:
        f.start()
    peak = [0.0]
    sampling = threading.Event()

    def sample_rss():
        while not sampling.is_set():
            peak[0] = max(peak[0], _rss_mb(d.pid))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample_rss, daemon=True)
    sampler.start()
    with d.client() as c:
        jobs = [c.submit("cats", name=f"load{i}") for i in range(JOBS)]
        assert c.status().jobs_by_state["queued"] >= JOBS - 1
        for job in jobs[:TRAINED]:
            done = wait_for(
                lambda: (j := c.job(job.id)).state in (pb.DONE, pb.FAILED) and j,
                timeout=120,
                what=f"{job.id} to train",
            )
            assert done.state == pb.DONE, done.error
        for job in jobs[TRAINED:]:
            try:
                c.cancel(job.id)
            except ClientError as e:  # it may have ended meanwhile
                assert e.code == grpc.StatusCode.FAILED_PRECONDITION
        wait_for(
            lambda: all(j.state in (pb.DONE, pb.FAILED, pb.CANCELLED) for j in c.jobs()),
            timeout=60,
            what="every job to end",
        )
        top = c.status().last_event_seq
        stored = [(e.global_seq, e.job_id, e.seq) for e in c.events(follow=False)]
    wait_for(
        lambda: all(out and out[-1][0] >= top for out in seen),
        timeout=60,
        what="every client to see the last event",
    )
    for stream, channel in zip(streams, channels):
        stream.cancel()
        channel.close()
    for f in followers:
        f.join(10)
    sampling.set()
    sampler.join()

    assert [g for g, _, _ in stored] == list(range(1, top + 1))
    per_job: dict[str, list[int]] = {}
    for _, job_id, seq in stored:
        per_job.setdefault(job_id, []).append(seq)
    for job_id, seqs in per_job.items():
        if job_id:
            assert seqs == list(range(1, len(seqs) + 1)), job_id
    progress = sum(1 for e in stored if e[1] in {j.id for j in jobs[:TRAINED]})
    assert progress > 10 * TRAINED, "the trained jobs' own events are in the stream"
    for i, out in enumerate(seen):
        assert out == stored, f"client {i} saw {len(out)} events, the daemon stored {len(stored)}"
    hwm = _rss_mb(d.pid, "VmHWM")
    print(
        f"server RSS: idle {idle_mb:.0f} MB, sampled peak {peak[0]:.0f} MB, high-water mark {hwm:.0f} MB; {len(stored)} events x {CLIENTS} clients"
    )
    assert hwm < RSS_LIMIT_MB, f"the server's memory peaked at {hwm:.0f} MB"


def test_streams_past_the_limit_are_refused_and_calls_still_answer(home, daemons):
    """Each open event stream holds one of the server's threads; past its limit a new stream is
    refused at once (RESOURCE_EXHAUSTED) instead of waiting for a thread that never frees, and
    Status, which needs a thread too, still answers."""
    from loradrop.daemon.service import MAX_STREAMS

    d = daemons(home, "--workers", "0", "--quiet-seconds", "3600")
    channel = grpc.insecure_channel(d.connect)
    stub = rpc.LoradropStub(channel)
    streams = [stub.StreamEvents(pb.StreamEventsRequest(follow=True), timeout=60) for _ in range(MAX_STREAMS)]
    try:
        make_dataset(home / "inbox" / "cats")
        stub.SubmitJob(pb.SubmitJobRequest(dataset="cats"), timeout=10)
        for s in streams:  # every one of them is open and got the event
            assert next(s).kind == "state"
        with pytest.raises(grpc.RpcError) as e:
            next(stub.StreamEvents(pb.StreamEventsRequest(follow=True), timeout=10))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "streams" in e.value.details()
        assert stub.Status(pb.StatusRequest(), timeout=10).pid == d.pid
    finally:
        for s in streams:
            s.cancel()
    # once they are closed, streams are served again
    wait_for(
        lambda: (
            _status_code(lambda: next(stub.StreamEvents(pb.StreamEventsRequest(follow=False), timeout=10)))
            == grpc.StatusCode.OK
        ),
        timeout=20,
        what="streams to be served again",
    )
    channel.close()


def _status_code(call) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK
