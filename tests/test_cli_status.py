"""What `loradrop status` prints for a daemon's StatusReply: the cluster and where each worker
runs when the daemon is on Ray, and the same lines as before without it."""

from __future__ import annotations

from loradrop.commands.status import status_lines
from loradrop.proto.v1 import loradrop_pb2 as pb


def reply(**fields) -> pb.StatusReply:
    return pb.StatusReply(
        version="0.9.0",
        pid=4242,
        started=1000.0,
        home="/srv/loradrop",
        inbox="/srv/loradrop/inbox",
        quiet_seconds=10.0,
        jobs_by_state={"running": 1, "queued": 2},
        **fields,
    )


def test_a_local_daemon_prints_its_workers_as_before():
    s = reply(
        workers=[
            pb.Worker(index=0, device="cuda:0", pid=77, state="busy", job_id="0001-cats"),
            pb.Worker(index=1, device="cuda:1", state="stopped"),
        ]
    )
    assert status_lines(s, now=1065.0) == [
        "loradrop daemon 0.9.0, pid 4242, up 01:05",
        "home     /srv/loradrop",
        "inbox    /srv/loradrop/inbox (quiet time 10s)",
        "model    the embedded tiny twin",
        "worker 0 cuda:0  busy running 0001-cats (pid 77)",
        "worker 1 cuda:1  stopped",
        "jobs     2 queued, 1 running",
    ]


def test_a_daemon_on_a_ray_cluster_prints_its_nodes_and_where_each_worker_runs():
    cluster = pb.Cluster(
        address="10.0.0.1:6379",
        resource="GPU",
        nodes=[
            pb.Node(id="aa01", address="10.0.0.1", alive=True, gpus=1, gpus_free=0),
            pb.Node(id="bb02", address="10.0.0.2", alive=True, gpus=2, gpus_free=1, labels=["a100", "big"]),
            pb.Node(id="cc03", address="10.0.0.3", alive=False, gpus=4, gpus_free=4),
        ],
    )
    workers = [
        pb.Worker(index=0, device="cuda:0", pid=77, state="busy", job_id="0001-cats", node="aa01"),
        pb.Worker(index=1, device="cuda:0", pid=91, state="idle", node="bb02"),
    ]
    lines = status_lines(reply(cluster=cluster, workers=workers), now=1065.0)
    assert lines[4:] == [
        "cluster  10.0.0.1:6379, 2 nodes, 3 GPUs (1 idle), 1 down",  # the lost node's GPUs are not counted
        "node aa01 10.0.0.1  1 GPU (0 idle)",
        "node bb02 10.0.0.2  2 GPU (1 idle)  labels a100 big",
        "node cc03 10.0.0.3  down",
        "worker 0 cuda:0  busy running 0001-cats on aa01 (pid 77)",
        "worker 1 cuda:0  idle on bb02 (pid 91)",
        "jobs     2 queued, 1 running",
    ]


def test_a_stand_in_resource_is_named():
    cluster = pb.Cluster(
        address="127.0.0.1:6379",
        resource="fake_gpu",
        nodes=[pb.Node(id="aa01", address="127.0.0.1", alive=True, gpus=1, gpus_free=1)],
    )
    assert "cluster  127.0.0.1:6379, 1 node, 1 GPU (1 idle), counting the resource fake_gpu" in (
        status_lines(reply(cluster=cluster), now=1065.0)
    )
