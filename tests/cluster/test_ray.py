"""The daemon's workers as Ray actors, on Ray's own multi-node test cluster on loopback: CPU nodes
that each offer one TEST_GPU (the resource standing in for a GPU), a head that offers none.

Every daemon here runs with --ray-transfer always, so the nodes work in copies of the home as on
machines that cannot see its disk, and everything a job makes must come back through the stream."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from loradrop.proto.client import state_name
from loradrop.proto.v1 import loradrop_pb2 as pb
from loradrop.testing import TEST_GPU, Daemon, RayTestCluster, make_dataset, wait_for

pytest.importorskip("ray")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

STEPS = 10
SETTINGS = {"max_train_steps": STEPS, "block_vector": "1,0,0,0,0,0,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0"}
ENV = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    scratch = tmp_path_factory.mktemp("node-scratch")
    os.environ["LORADROP_RAY_SCRATCH"] = str(scratch)  # the nodes' processes inherit it
    c = RayTestCluster((), ("big",))
    c.scratch = scratch
    yield c
    c.shutdown()
    os.environ.pop("LORADROP_RAY_SCRATCH", None)


def ray_daemon(home: Path, cluster: RayTestCluster, transfer: str = "always", retries: int = 2) -> Daemon:
    return Daemon(
        home,
        "--ray", cluster.address, "--ray-resource", TEST_GPU, "--ray-transfer", transfer,
        "--quiet-seconds", "0.5", "--max-retries", str(retries), "--heartbeat-seconds", "30",
        env=ENV,
    )  # fmt: skip


@pytest.fixture
def ray_home():
    root = Path(tempfile.mkdtemp(prefix="ldr-", dir="/tmp"))
    yield root / "home"
    shutil.rmtree(root, ignore_errors=True)


def _drop(home: Path, name: str, **settings) -> Path:
    folder = make_dataset(home.parent / f"staging-{name}", settings={**SETTINGS, **settings})
    return Path(shutil.move(folder, home / "inbox" / name))


def _job_named(client, name: str) -> pb.Job:
    return wait_for(lambda: next((j for j in client.jobs() if j.name == name), None), what=f"job {name}")


def _node_running(client, job_id: str, step: int = 0) -> str:
    """The node whose worker runs `job_id`, once it trained `step` steps."""

    def running():
        job = client.job(job_id)
        assert job.state in (pb.QUEUED, pb.RUNNING), (
            f"{job_id} ended early: {state_name(job.state)} {job.error}"
        )
        if job.state != pb.RUNNING or (
            step and not (job.progress.stage == "train" and job.progress.done >= step)
        ):
            return None
        return next((w.node for w in client.status().workers if w.job_id == job_id and w.node), None)

    return wait_for(running, timeout=180, interval=0.05, what=f"{job_id} running (step {step})")


def _tensors(path: str) -> dict:
    from loradrop.engine.tensorfile import TensorFile

    with TensorFile(path) as f:
        return f.read_all()


def _same_weights(a: str, b: str) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    assert [k for k in ta if not bool((ta[k] == tb[k]).all())] == []


def _logs(client, job_id: str) -> str:
    return "\n".join(e.log.text for e in client.events(job_id, follow=False) if e.HasField("log"))


@dataclass
class Pair:
    """Two jobs run at once on the two nodes; one node was killed mid-training."""

    home: Path
    whole: pb.Job  # never interrupted
    resumed: pb.Job  # its node killed; finished on the other
    nodes: tuple[str, str]  # where each ran first
    finished_on: str  # the resumed job's last "runs on node …" log line


@pytest.fixture(scope="module")
def pair(cluster, tmp_path_factory) -> Pair:
    home = Path(tempfile.mkdtemp(prefix="ldr-", dir="/tmp")) / "home"
    d = ray_daemon(home, cluster).start(wait=True)
    labels = None
    try:
        with d.client() as c:
            wait_for(lambda: len(c.status().workers) == 2, what="a worker per node")
            _drop(home, "whole")
            _drop(home, "resumed")
            whole, resumed = _job_named(c, "whole"), _job_named(c, "resumed")
            nodes = (_node_running(c, whole.id), _node_running(c, resumed.id, step=3))
            labels = cluster.kill(cluster.node_of(nodes[1]))
            whole = c.wait_job(whole.id, 240)
            resumed = c.wait_job(resumed.id, 240)
            ran_on = [line for line in _logs(c, resumed.id).splitlines() if line.startswith("runs on node ")]
    except Exception:
        print(d.log()[-20000:])  # shown with the failure
        raise
    finally:
        # Before the tests that use it: this daemon's workers must let go of the nodes' GPUs, and
        # the next tests need two nodes again.
        d.stop()
        if labels is not None:
            cluster.add(*labels)  # the killed node's place taken, with its labels
    yield Pair(home, whole, resumed, nodes, ran_on[-1])
    shutil.rmtree(home.parent, ignore_errors=True)


def test_two_jobs_run_on_two_nodes_at_once(pair):
    assert pair.nodes[0] != pair.nodes[1]
    assert pair.whole.state == pb.DONE, pair.whole.error


def test_a_job_whose_node_dies_finishes_on_another_with_the_same_weights(pair):
    assert pair.resumed.state == pb.DONE, pair.resumed.error
    assert pair.finished_on.startswith("runs on node ") and pair.nodes[1] not in pair.finished_on
    _same_weights(pair.whole.final, pair.resumed.final)


def test_everything_a_job_made_is_in_the_daemon_home(pair, cluster):
    for job in (pair.whole, pair.resumed):
        out = pair.home / "outputs" / job.id
        for path in (job.final, job.resized, job.chopped):
            assert Path(path).is_file() and Path(path).parent == out, path
        assert list(out.glob("*-step*.safetensors")), "the step checkpoints came back too"
    copies = {p.relative_to(cluster.scratch).parts[0] for p in _copied(cluster, pair.whole.id)}
    assert copies == set(), "a node removes its copy of a job that finished there"
    copies = {p.relative_to(cluster.scratch).parts[0] for p in _copied(cluster, pair.resumed.id)}
    assert len(copies) <= 1, "only the killed node's copy is left (the next actor there sweeps it)"


def _copied(cluster, job_id: str) -> list[Path]:
    return [p for p in cluster.scratch.glob(f"*/outputs/{job_id}/*") if p.is_file()]


def test_a_daemon_restarted_while_the_cluster_runs_resumes_its_job(pair, cluster, ray_home):
    first = ray_daemon(ray_home, cluster).start()
    try:
        with first.client() as c:
            job = _job_named(c, _drop(ray_home, "again").name)
            _node_running(c, job.id, step=3)
        first.kill()  # kill -9: Ray ends the actors it owned
        second = ray_daemon(ray_home, cluster).start()
        with second.client() as c:
            done = c.wait_job(job.id, 240)
            assert done.state == pb.DONE, done.error
            assert "the daemon stopped while this job ran" in _logs(c, job.id)
            wait_for(lambda: sum(w.state in ("idle", "busy") for w in c.status().workers) == 2,
                     what="both nodes' GPUs free for the new daemon's workers")  # fmt: skip
        _same_weights(pair.whole.final, done.final)
        assert _copied(cluster, pair.resumed.id) == [], "the new actors swept the dead ones' copies"
        assert second.stop() == 0, "SIGTERM stops a daemon on Ray cleanly (not Ray's own handler)"
    except Exception:
        print(locals().get("second", first).log()[-20000:])
        raise
    finally:
        for d in (first, locals().get("second")):
            if d is not None and d.process.poll() is None:
                d.kill()


def test_a_pinned_job_runs_only_on_a_node_with_its_label_and_a_shared_home_is_not_copied(cluster, ray_home):
    d = ray_daemon(ray_home, cluster, transfer="auto").start()
    try:
        with d.client() as c:
            big = next(n.id for n in c.status().cluster.nodes if "big" in n.labels)
            pinned = [_job_named(c, _drop(ray_home, f"pinned{i}", pin="big").name) for i in range(2)]
            for job in pinned:
                done = c.wait_job(job.id, 240)
                assert done.state == pb.DONE, done.error
                ran_on = {line for line in _logs(c, job.id).splitlines() if line.startswith("runs on node ")}
                assert ran_on == {f"runs on node {big}"}
        copies = [p for p in cluster.scratch.rglob("*") if p.is_file()]
        assert copies == [], "a node that sees the home works in it"
        assert d.stop() == 0
    finally:
        if d.process.poll() is None:
            d.kill()


def test_a_job_whose_nodes_keep_dying_fails_after_its_retries_and_names_the_node(cluster, ray_home):
    d = ray_daemon(ray_home, cluster, retries=1).start()
    killed = []
    try:
        with d.client() as c:
            job = _job_named(c, _drop(ray_home, "doomed").name)
            first = _node_running(c, job.id, step=2)
            killed.append(cluster.kill(cluster.node_of(first)))
            wait_for(lambda: "retry 1 of 1" in _logs(c, job.id), timeout=60, what="the loss noticed")
            second = _node_running(c, job.id, step=1)  # resumed on the other node
            assert second != first
            killed.append(cluster.kill(cluster.node_of(second)))
            failed = c.wait_job(job.id, 120)
            assert failed.state == pb.FAILED
            assert f"lost with its Ray node {second}" in failed.error, failed.error
    except Exception:
        print(d.log()[-20000:])
        raise
    finally:
        for labels in killed:
            cluster.add(*labels)
        if d.process.poll() is None:
            assert d.stop() == 0


def test_a_preview_renders_on_a_node_and_its_images_come_back(cluster, ray_home):
    d = ray_daemon(ray_home, cluster).start()
    try:
        with d.client() as c:
            job = c.wait_job(_job_named(c, _drop(ray_home, "seen").name).id, 240)
            assert job.state == pb.DONE, job.error
            # the job's copy is gone from its node by now: the LoRA is sent to the node again
            images = c.preview(
                job.final, vector=SETTINGS["block_vector"], prompts=["zkw thing --w 64 --h 64 --s 2"], seed=3
            )
            assert [i.width for i in images] == [64]
            for image in images:
                path = Path(image.path)
                assert path.is_file() and path.parent == ray_home / "outputs" / job.id / "previews", path
        assert d.stop() == 0
    except Exception:
        print(d.log()[-20000:])
        raise
    finally:
        if d.process.poll() is None:
            d.kill()
