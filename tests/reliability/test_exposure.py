"""The daemon's doors, tried the way an intruder would: who can open the socket and the files,
what TCP gives away without TLS or the token (every RPC, health and reflection included), and
every request that takes a path, tried with traversals and symlinks out of the daemon's folders."""

from __future__ import annotations

import io
import os
import shutil
import stat
import tarfile
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from loradrop.proto.v1 import loradrop_pb2 as pb
from loradrop.proto.v1 import loradrop_pb2_grpc as rpc
from loradrop.testing import make_dataset, wait_for

pytestmark = pytest.mark.timeout(300)
DEADLINE = 20.0
SERVICE = pb.DESCRIPTOR.services_by_name["Loradrop"]


def _empty_call(channel: grpc.Channel, method, metadata=()) -> grpc.StatusCode:
    """`method` called with an empty request (a stream of one for client streaming)."""
    name = f"/{SERVICE.full_name}/{method.name}"
    request = b""  # the empty message of any type
    try:
        if method.client_streaming:
            channel.stream_unary(name)(iter([request]), metadata=metadata, timeout=DEADLINE)
        elif method.server_streaming:
            for _ in channel.unary_stream(name)(request, metadata=metadata, timeout=DEADLINE):
                break
        else:
            channel.unary_unary(name)(request, metadata=metadata, timeout=DEADLINE)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def test_tcp_gives_nothing_without_tls_and_the_token(home, tls_daemon, tls):
    cert, key, token = tls
    d = tls_daemon()
    secret = token.read_text().strip()
    assert not (home / "daemon.sock").exists(), "a TCP daemon opened the unix socket as well"

    # Plain TCP to the TLS port: the handshake fails, nothing is served.
    with grpc.insecure_channel(d.connect) as plain:
        assert (
            _empty_call(plain, SERVICE.methods_by_name["Status"], (("authorization", f"Bearer {secret}"),))
            == grpc.StatusCode.UNAVAILABLE
        )
    # TLS that does not trust this certificate (a stranger's daemon, or a man in the middle).
    with grpc.secure_channel(d.connect, grpc.ssl_channel_credentials()) as untrusted:
        assert (
            _empty_call(
                untrusted, SERVICE.methods_by_name["Status"], (("authorization", f"Bearer {secret}"),)
            )
            == grpc.StatusCode.UNAVAILABLE
        )

    credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    with grpc.secure_channel(d.connect, credentials) as channel:
        wrong = [
            (),
            (("authorization", "Bearer"),),
            (("authorization", f"bearer {secret}"),),
            (("authorization", secret),),
            (("authorization", f"Bearer {secret[:-1]}"),),
            (("authorization", f"Bearer {secret} "),),
            (("authorization", f"Bearer {secret}x"),),
        ]
        for metadata in wrong:
            for method in SERVICE.methods:
                assert _empty_call(channel, method, metadata) == grpc.StatusCode.UNAUTHENTICATED, (
                    method.name,
                    metadata,
                )
            health = health_pb2_grpc.HealthStub(channel)
            with pytest.raises(grpc.RpcError) as e:
                health.Check(health_pb2.HealthCheckRequest(), metadata=metadata, timeout=DEADLINE)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as e:
                next(iter(health.Watch(health_pb2.HealthCheckRequest(), metadata=metadata, timeout=DEADLINE)))
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            with pytest.raises(grpc.RpcError) as e:
                list(
                    reflection.ServerReflectionInfo(
                        iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                        metadata=metadata,
                        timeout=DEADLINE,
                    )
                )
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, (
                "reflection must not list the API to a stranger"
            )

        good = (("authorization", f"Bearer {secret}"),)
        assert _empty_call(channel, SERVICE.methods_by_name["Status"], good) == grpc.StatusCode.OK
        replies = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), metadata=good, timeout=DEADLINE
        )
        assert SERVICE.full_name in {s.name for r in replies for s in r.list_services_response.service}
    assert d.process.poll() is None


@pytest.mark.slow
def test_every_file_the_daemon_writes_is_private(home, daemons):
    d = daemons(home, "--workers", "1", "--quiet-seconds", "3600", env={"OMP_NUM_THREADS": "1"})
    make_dataset(
        home / "inbox" / "cats",
        settings={"max_train_steps": 2, "resize_recipe": "", "block_vector": "1" + ",0" * 20},
    )
    with d.client() as c:
        job = c.submit("cats")
        wait_for(lambda: c.job(job.id).state in (pb.DONE, pb.FAILED), timeout=120, what="the job")
        assert c.job(job.id).state == pb.DONE, c.job(job.id).error
    sock = home / "daemon.sock"
    assert stat.S_ISSOCK(os.stat(sock).st_mode) and stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    open_to_others = []
    for path in [home, *home.rglob("*")]:
        if path == sock or path.is_symlink():
            continue
        mode = stat.S_IMODE(path.stat().st_mode)
        # Datasets are the user's own files, copied in with their modes; all else is the daemon's.
        if mode & 0o077 and not path.is_relative_to(home / "inbox"):
            open_to_others.append(f"{path.relative_to(home)} {mode:o}")
    assert not open_to_others, open_to_others
    assert stat.S_IMODE(home.stat().st_mode) == 0o700


def _refused(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        result = call()
        if hasattr(result, "__next__"):
            list(result)
    return e.value.code()


def test_no_path_taking_request_reaches_outside(home, daemons, tmp_path):
    d = daemons(home, "--workers", "0", "--quiet-seconds", "3600")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes((make_dataset(tmp_path / "ds") / "img0.png").read_bytes())
    (outside / "secret.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    shutil.copytree(tmp_path / "ds", outside / "dataset")
    make_dataset(home / "inbox" / "cats")
    stub = rpc.LoradropStub(grpc.insecure_channel(d.connect))
    job = stub.SubmitJob(pb.SubmitJobRequest(dataset="cats"), timeout=DEADLINE)
    out = home / "outputs" / job.id
    out.mkdir(parents=True)
    (out / "file-link.safetensors").symlink_to(outside / "secret.safetensors")
    (out / "file-link.png").symlink_to(outside / "secret.png")
    (out / "dir-link").symlink_to(outside, target_is_directory=True)
    (home / "inbox" / "dataset-link").symlink_to(outside / "dataset", target_is_directory=True)
    (home / "models" / "model-link.safetensors").symlink_to(outside / "secret.safetensors")

    escapes = [
        str(outside / "secret.safetensors"),
        str(outside / "secret.png"),
        "../../" + str(outside.relative_to("/")) + "/secret.png",
        f"{out}/../../../{outside.relative_to(home.parent) if outside.is_relative_to(home.parent) else '..' + str(outside)}/secret.png",
        str(out / "file-link.safetensors"),
        str(out / "file-link.png"),
        str(out / "dir-link" / "secret.png"),
        str(out / "dir-link" / "secret.safetensors"),
        f"{job.id}/../../state.sqlite",
        "../state.sqlite",
        str(home / "state.sqlite"),
        "//etc//hostname",
        "/proc/self/environ",
        "~/.bashrc",
    ]
    denied = {grpc.StatusCode.PERMISSION_DENIED}
    for path in escapes:
        assert _refused(
            lambda: stub.GetSample(pb.GetSampleRequest(path=path), timeout=DEADLINE)
        ) in denied | {grpc.StatusCode.NOT_FOUND}, path
        assert _refused(
            lambda: stub.DownloadArtifact(pb.ArtifactRef(path=path), timeout=DEADLINE)
        ) in denied | {grpc.StatusCode.NOT_FOUND}, path
        for call in (
            lambda: stub.BlockLayout(pb.ArtifactRef(path=path), timeout=DEADLINE),
            lambda: stub.Chop(pb.ChopRequest(path=path, vector="SDXL-LyC-MIDALL"), timeout=DEADLINE),
            lambda: stub.Resize(pb.ResizeRequest(path=path, recipe="fro_ckpt=1,thr=-3.55"), timeout=DEADLINE),
            lambda: stub.Preview(pb.PreviewRequest(path=path), timeout=DEADLINE),
        ):
            assert _refused(call) in denied | {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT}, (
                path
            )
        assert _refused(
            lambda: stub.SubmitJob(pb.SubmitJobRequest(dataset="cats", model=path), timeout=DEADLINE)
        ) in denied | {grpc.StatusCode.INVALID_ARGUMENT}, path
    for path in [
        str(outside / "dataset"),
        "dataset-link",
        str(home / "inbox" / "dataset-link"),
        "../outputs",
        "cats/../../outputs",
        "/",
        "..",
    ]:
        assert (
            _refused(lambda: stub.SubmitJob(pb.SubmitJobRequest(dataset=path), timeout=DEADLINE)) in denied
        ), path
    assert (
        _refused(
            lambda: stub.SubmitJob(
                pb.SubmitJobRequest(dataset="cats", model="model-link.safetensors"), timeout=DEADLINE
            )
        )
        in denied
    )

    # Names that become paths inside a job are settings, not requests: they must not lead out either.
    for override in [
        "sample_prompts=/etc/hostname",
        "sample_prompts=../../../../etc/hostname",
        "log_prefix=../../../escaped",
        "caption_extension=/../../x",
        "output_name=../../x",
    ]:
        assert (
            _refused(
                lambda: stub.SubmitJob(
                    pb.SubmitJobRequest(dataset="cats", overrides=[override]), timeout=DEADLINE
                )
            )
            == grpc.StatusCode.INVALID_ARGUMENT
        ), override
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w") as t:
        t.add(home / "inbox" / "cats" / "img0.png", arcname="img0.png")
        t.add(
            home / "inbox" / "cats" / "img0.txt", arcname="img0.txt"
        )  # captioned: the names are what is tried here
    for name in ["../../evil", "/abs/evil", ".hidden", "a/b", "\n"]:
        uploaded = stub.UploadDataset(
            iter([pb.UploadChunk(job=pb.SubmitJobRequest(dataset=name), data=tar.getvalue())]),
            timeout=DEADLINE,
        )
        assert Path(uploaded.dataset).parent == home / "inbox" and not Path(uploaded.dataset).name.startswith(
            "."
        ), uploaded.dataset
    # The same settings in a folder's loradrop.toml make a refused job, not a read of /etc.
    make_dataset(
        home / "inbox" / "sneaky", settings={"sample_prompts": "/etc/hostname", "sample_every_n_steps": 1}
    )
    make_dataset(home / "inbox" / "sneakier", settings={"model": "../../../etc/hostname"})
    for name in ("sneaky", "sneakier"):
        assert _refused(
            lambda: stub.SubmitJob(pb.SubmitJobRequest(dataset=name), timeout=DEADLINE)
        ) in denied | {grpc.StatusCode.INVALID_ARGUMENT}, name
    assert d.process.poll() is None
