"""The daemon's doors: a private socket, TCP only with TLS and a token, no path outside its folders."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loradrop.proto.client import ClientError
from loradrop.proto.v1 import loradrop_pb2 as pb
from loradrop.proto.v1 import loradrop_pb2_grpc as rpc
from loradrop.testing import free_port, make_dataset, wait_for

pytestmark = pytest.mark.timeout(120)


def test_home_is_private_and_socket_is_0600(home, daemons):
    daemons(home, "--workers", "0")
    assert stat.S_IMODE(os.stat(home).st_mode) == 0o700
    sock = home / "daemon.sock"
    assert stat.S_ISSOCK(os.stat(sock).st_mode)
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(home / "state.sqlite").st_mode) & 0o077 == 0


def test_a_second_daemon_on_the_same_home_refuses_to_start(home, daemons):
    daemons(home, "--workers", "0")
    second = subprocess.run(
        [sys.executable, "-m", "loradrop", "daemon", "--home", str(home), "--workers", "0"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert second.returncode == 2
    assert "another daemon is already running" in second.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--listen", "0.0.0.0:{port}"], "needs TLS and a token"),
        (["--listen", "127.0.0.1:{port}"], "add --insecure-loopback"),
        (["--listen", "0.0.0.0:{port}", "--insecure-loopback"], "only allows a loopback address"),
    ],
)
def test_tcp_without_tls_and_token_refuses_to_start(home, args, message):
    args = [a.format(port=free_port()) for a in args]
    result = subprocess.run(
        [sys.executable, "-m", "loradrop", "daemon", "--home", str(home), "--workers", "0", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr


def test_insecure_loopback_serves_plain_tcp(home, daemons):
    port = free_port()
    d = daemons(
        home,
        "--workers",
        "0",
        "--listen",
        f"127.0.0.1:{port}",
        "--insecure-loopback",
        connect=f"127.0.0.1:{port}",
    )
    with d.client() as c:
        assert c.status().inbox == str(home / "inbox")


def test_tcp_with_tls_checks_the_token_on_every_call(home, tls_daemon, tls):
    cert, key, token = tls
    d = tls_daemon()
    with d.client() as c:
        assert c.status().pid == d.pid
    for wrong in (None, "wrong-token-" + "y" * 20):
        with d.client(token=wrong, token_file=None) as c:
            with pytest.raises(ClientError) as e:
                c.status()
            assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(ClientError) as e:
                list(c.events(follow=False, reconnect=False))
            assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
    # health is guarded too, and answers with the token
    credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    with grpc.secure_channel(d.connect, credentials) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        with pytest.raises(grpc.RpcError) as e:
            stub.Check(health_pb2.HealthCheckRequest(service="loradrop.v1.Loradrop"), timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        auth = (("authorization", f"Bearer {token.read_text().strip()}"),)
        reply = stub.Check(
            health_pb2.HealthCheckRequest(service="loradrop.v1.Loradrop"), metadata=auth, timeout=10
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_api(home, daemons):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    daemons(home, "--workers", "0")
    with grpc.insecure_channel(f"unix:{home / 'daemon.sock'}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
        )
        services = {s.name for r in replies for s in r.list_services_response.service}
    assert {"loradrop.v1.Loradrop", "grpc.health.v1.Health"} <= services


def _code(call) -> grpc.StatusCode:
    with pytest.raises(ClientError) as e:
        call()
    return e.value.code


def test_paths_outside_the_inbox_and_outputs_are_refused(home, daemons, tmp_path):
    d = daemons(home, "--workers", "0", "--quiet-seconds", "60")
    outside = make_dataset(tmp_path / "outside")
    (home / "outputs" / "0001-x").mkdir(parents=True)
    (home / "outputs" / "0001-x" / "leak.png").symlink_to("/etc/hostname")
    (home / "inbox" / "linked").symlink_to(outside, target_is_directory=True)
    with d.client() as c:
        denied = grpc.StatusCode.PERMISSION_DENIED
        assert _code(lambda: c.submit(outside)) == denied
        assert _code(lambda: c.submit("../../../etc")) == denied
        assert _code(lambda: c.submit(home / "inbox" / "linked")) == denied
        assert _code(lambda: c.sample("/etc/hostname")) == denied
        assert _code(lambda: c.sample("../state.sqlite")) == denied
        assert _code(lambda: c.sample(str(home / "outputs" / "0001-x" / "leak.png"))) == denied
        assert _code(lambda: c.download(str(home / "state.sqlite"), tmp_path / "x")) == denied
        assert _code(lambda: c.download("../daemon.lock", tmp_path / "x")) == denied
        assert _code(lambda: c.block_layout("/etc/hostname")) == denied
        make_dataset(home / "inbox" / "ok")
        assert _code(lambda: c.submit("ok", model="/etc/hostname")) == denied
        assert _code(lambda: c.submit("ok", model="../state.sqlite")) == denied
        assert c.jobs() == []


def test_a_folder_with_links_out_of_the_inbox_is_refused(home, daemons, tmp_path):
    d = daemons(home, "--workers", "0", "--quiet-seconds", "0.3")
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the daemon")
    sneaky = make_dataset(tmp_path / "staging" / "sneaky")
    (sneaky / "extra.txt").symlink_to(secret)
    shutil.move(sneaky, home / "inbox" / "sneaky")
    (home / "inbox" / "elsewhere").symlink_to(tmp_path / "staging", target_is_directory=True)
    with d.client() as c:
        jobs = wait_for(lambda: len(c.jobs()) == 2 and c.jobs(), what="both folders to be judged")
        for job in jobs:
            assert job.state == pb.FAILED
            assert "pointing outside the inbox" in job.error
        warnings = [e.log.text for e in c.events(follow=False) if e.HasField("log")]
        assert any("sneaky refused" in w for w in warnings)
        assert _code(lambda: c.submit(home / "inbox" / "sneaky")) == grpc.StatusCode.PERMISSION_DENIED


def test_malformed_requests_get_invalid_argument_with_a_message(home, daemons):
    d = daemons(home, "--workers", "0", "--quiet-seconds", "60")
    make_dataset(home / "inbox" / "cats")
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    with d.client() as c:
        for overrides, words in (
            (["max_train_steps"], "is not key=value"),
            (["max_train_steps=many"], "must be an integer"),
            (["max_trian_steps=3"], "did you mean"),
        ):
            with pytest.raises(ClientError) as e:
                c.submit("cats", overrides=overrides)
            assert e.value.code == invalid and words in str(e.value)
        with pytest.raises(ClientError) as e:
            c.submit("cats", block_vector="1,zero,1")
        assert e.value.code == invalid and "block vector" in str(e.value)
        assert _code(lambda: c.submit("")) == invalid
        assert _code(lambda: c.job("")) == invalid
        assert _code(lambda: c.job("4242")) == grpc.StatusCode.NOT_FOUND
        assert _code(lambda: list(c.events(since=-1, follow=False, reconnect=False))) == invalid
        assert _code(lambda: c.sample(home / "inbox" / "cats" / "img0.png", max_size=-5)) == invalid
        assert c.sample(home / "inbox" / "cats" / "img0.png", max_size=16).width == 16
        assert _code(lambda: c.sample(home / "inbox" / "cats" / "img0.txt")) == invalid
        raw = rpc.LoradropStub(grpc.insecure_channel(d.connect))
        with pytest.raises(grpc.RpcError) as e:
            raw.ListJobs(pb.ListJobsRequest(states=[17]), timeout=10)
        assert e.value.code() == invalid and "not one of" in e.value.details()
        assert len(c.jobs()) == 0  # nothing malformed was queued


def test_upload_names_are_sanitised_and_stay_in_the_inbox(home, daemons, tmp_path):
    d = daemons(home, "--workers", "0", "--quiet-seconds", "60")
    source = make_dataset(tmp_path / "src")
    with d.client() as c:
        job = c.upload(source, name="../../evil name\n")
        assert job.name == "evil-name"
        assert job.dataset == str(home / "inbox" / "src")
        assert sorted(p.name for p in (home / "inbox" / "src").iterdir()) == [
            "img0.png",
            "img0.txt",
            "img1.png",
            "img1.txt",
            "loradrop.toml",
        ]
        again = c.upload(source)
        assert again.dataset == str(home / "inbox" / "src-2")


def test_a_tar_with_paths_out_of_the_folder_is_refused(home, daemons, tmp_path):
    import io
    import tarfile

    d = daemons(home, "--workers", "0", "--quiet-seconds", "60")
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as tar:
        info = tarfile.TarInfo("../../escaped.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    raw = rpc.LoradropStub(grpc.insecure_channel(d.connect))
    messages = [pb.UploadChunk(job=pb.SubmitJobRequest(dataset="evil"), data=data.getvalue())]
    with pytest.raises(grpc.RpcError) as e:
        raw.UploadDataset(iter(messages), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert not (home / "escaped.txt").exists() and not (home.parent / "escaped.txt").exists()
    assert [p.name for p in (home / "inbox").iterdir()] == []


def test_a_taken_port_is_one_clear_sentence(home, daemons, tmp_path):
    port = free_port()
    daemons(
        home,
        "--workers",
        "0",
        "--listen",
        f"127.0.0.1:{port}",
        "--insecure-loopback",
        connect=f"127.0.0.1:{port}",
    )
    other = subprocess.run(
        [
            sys.executable,
            "-m",
            "loradrop",
            "daemon",
            "--home",
            str(tmp_path / "other"),
            "--workers",
            "0",
            "--listen",
            f"127.0.0.1:{port}",
            "--insecure-loopback",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert other.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in other.stderr and "Traceback" not in other.stderr


def test_a_link_added_after_queueing_is_refused_by_the_worker(home, daemons, tmp_path):
    """The folder is checked when queued and again just before the worker reads it."""
    secret = tmp_path / "secret.png"
    secret.write_bytes((make_dataset(tmp_path / "model") / "img0.png").read_bytes())
    first = daemons(home, "--workers", "0", "--quiet-seconds", "60")
    folder = make_dataset(home / "inbox" / "late")
    with first.client() as c:
        job = c.submit("late")
        assert job.state == pb.QUEUED
    first.stop()
    (folder / "img9.png").symlink_to(secret)
    (folder / "img9.txt").write_text("a caption")
    second = daemons(home, "--quiet-seconds", "60")
    with second.client() as c:
        done = wait_for(
            lambda: (j := c.job(job.id)).state in (pb.FAILED, pb.DONE) and j,
            timeout=90,
            what="the job to end",
        )
        assert (
            done.state == pb.FAILED
            and "symlinks pointing outside the inbox" in done.error
            and "img9.png" in done.error
        )
        assert not any((home / "outputs" / job.id).glob("*.safetensors"))
