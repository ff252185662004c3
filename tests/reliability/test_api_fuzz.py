"""Every RPC of the service fuzzed through the generated stubs (and as raw bytes): malformed,
oversized and out-of-range requests each get a clear status with a sentence, never UNKNOWN or
INTERNAL, never a hang (every call has a deadline), and the daemon still answers afterwards."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loradrop.engine.tensorfile import write as write_tensors
from loradrop.proto.v1 import loradrop_pb2 as pb
from loradrop.proto.v1 import loradrop_pb2_grpc as rpc
from loradrop.testing import Daemon, make_dataset

pytestmark = [pytest.mark.timeout(300)]

DEADLINE = 20.0  # seconds; a call that reaches it has hung
CLEAR = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.OUT_OF_RANGE,
}
FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))

HOSTILE = [
    "",
    " ",
    ".",
    "..",
    "../..",
    "/",
    "//",
    "/etc/passwd",
    "/etc/",
    "../state.sqlite",
    "../../../../etc/hostname",
    "~",
    "~/x",
    "~root",
    "\0",
    "a\0b",
    "x" * 300,
    "y/" * 2100,
    "²",
    "٣",
    "9" * 30,
    "-1",
    "0",
    "1",
    " 1 ",
    "+1",
    "1e3",
    "0x10",
    "%s%n",
    "${HOME}",
    "💥" * 100,
    "a\nb",
    "\r\n",
    "\t",
    "' OR 1=1 --",
    "*",
    "%",
    "_",
    "\\",
    "con",
    "nul",
]
INT64 = st.one_of(
    st.sampled_from([0, 1, -1, 2**31 - 1, -(2**31), 2**63 - 1, -(2**63)]), st.integers(-(2**63), 2**63 - 1)
)
INT32 = st.one_of(st.sampled_from([0, 1, -1, 2**31 - 1, -(2**31)]), st.integers(-(2**31), 2**31 - 1))
OVERRIDES = [
    "max_train_steps=0",
    "max_train_steps=-1",
    "max_train_steps=99999999999999999999999",
    "max_train_steps=1.5",
    "learning_rate=nan",
    "learning_rate=inf",
    "learning_rate=-1",
    "resolution=0",
    "train_batch_size=0",
    "network_dim=-4",
    "seed=-5",
    "seed=1e400",
    "optimizer_args={a=1}",
    "lr_scheduler_args={num_cycles=-1}",
    'lr_scheduler_args={num_cycles="x"}',
    "optimizer_type=SGD",
    "output_name=../x",
    "output_name=",
    "x",
    "=",
    "=1",
    "a==b",
    "[table]",
    'key="unterminated',
    "max_train_steps=[1,2]",
    "max_train_steps={}",
    "resize_recipe=fro_ckpt=abc",
    "sample_prompts=../../x.txt",
    "caption_extension=",
    "caption_extension=txt",
    "log_prefix=",
    "mixed_precision=fp8",
]


@pytest.fixture(scope="module")
def api():
    """A queue-only daemon with a job whose output folder holds every kind of bad file."""
    root = Path(tempfile.mkdtemp(prefix="ldf-", dir="/tmp"))
    home = root / "home"
    d = Daemon(home, "--workers", "0", "--quiet-seconds", "3600").start()
    make_dataset(home / "inbox" / "cats")
    channel = grpc.insecure_channel(d.connect, options=[("grpc.max_send_message_length", 128 << 20)])
    stub = rpc.LoradropStub(channel)
    job = stub.SubmitJob(pb.SubmitJobRequest(dataset="cats"), timeout=DEADLINE)
    out = home / "outputs" / job.id
    out.mkdir(parents=True)
    (out / "garbage.safetensors").write_bytes(os.urandom(300))
    (out / "empty.safetensors").write_bytes(b"")
    (out / "huge-header.safetensors").write_bytes((2**62).to_bytes(8, "little") + b"{}")
    write_tensors(out / "notlora.safetensors", {"model.weight": torch.ones(4, 4), "other": torch.zeros(3)})
    write_tensors(out / "nan.safetensors", {"lora_unet_x.lora_down.weight": torch.full((2, 4), float("nan"))})
    (out / "sample.png").write_bytes((home / "inbox" / "cats" / "img0.png").read_bytes())
    (out / "loop.safetensors").symlink_to(out / "loop.safetensors")
    (out / "dir.safetensors").mkdir()
    os.mkfifo(out / "fifo.safetensors")
    (home / "inbox" / "loop").symlink_to(home / "inbox" / "loop")
    paths = [str(p) for p in out.iterdir()] + [
        str(home / "inbox" / "cats" / "img0.png"),
        str(home / "inbox" / "loop"),
        str(home / "state.sqlite"),
        str(out),
        "cats",
        job.id,
    ]
    yield d, stub, channel, job, paths
    channel.close()
    if d.process.poll() is None:
        d.stop(timeout=30)
    shutil.rmtree(root, ignore_errors=True)


def _status(call) -> grpc.StatusCode:
    try:
        result = call()
        if hasattr(result, "__next__"):  # a response stream: read it to its end
            for _ in result:
                pass
    except grpc.RpcError as e:
        assert e.code() in CLEAR, f"{e.code()}: {e.details()}"
        assert e.details() and "Traceback" not in e.details(), e.details()
        return e.code()
    return grpc.StatusCode.OK


def _texts(paths):
    return st.one_of(st.sampled_from(HOSTILE + paths), st.text(max_size=40))


def _still_answers(d: Daemon, stub) -> None:
    assert d.process.poll() is None, f"the daemon died:\n{d.log()}"
    assert stub.Status(pb.StatusRequest(), timeout=DEADLINE).pid == d.pid


@FUZZ
@given(data=st.data())
def test_job_calls(api, data):
    d, stub, _, job, paths = api
    refs = st.one_of(_texts(paths), st.sampled_from([job.id, str(job.number), f"{job.number:04d}"]))
    ref = pb.JobRef(job_id=data.draw(refs))
    for method in (
        stub.GetJob,
        stub.CancelJob,
        stub.RetryJob,
        stub.SaveNow,
        stub.SampleNow,
        stub.ListArtifacts,
        stub.AcceptCaptions,
        stub.ListCaptions,
    ):
        _status(lambda: method(ref, timeout=DEADLINE))
    caption = pb.SetCaptionRequest(
        job_id=ref.job_id, image=data.draw(_texts(paths)), text=data.draw(st.text(max_size=40))
    )
    _status(lambda: stub.SetCaption(caption, timeout=DEADLINE))
    states = data.draw(st.lists(INT32, max_size=5))
    code = _status(lambda: stub.ListJobs(pb.ListJobsRequest(states=states), timeout=DEADLINE))
    assert code == grpc.StatusCode.OK or any(s not in pb.JobState.values() or s == 0 for s in states)
    request = pb.StreamEventsRequest(
        job_id=data.draw(st.one_of(refs, st.just(""))), since=data.draw(INT64), follow=False
    )
    _status(lambda: stub.StreamEvents(request, timeout=DEADLINE))
    _still_answers(d, stub)


@FUZZ
@given(data=st.data())
def test_submit_calls(api, data):
    d, stub, _, _, paths = api
    request = pb.SubmitJobRequest(
        dataset=data.draw(_texts(paths)),
        overrides=data.draw(
            st.lists(st.one_of(st.sampled_from(OVERRIDES), st.text(max_size=30)), max_size=4)
        ),
        name=data.draw(_texts(paths)),
        model=data.draw(st.one_of(st.just(""), _texts(paths))),
        block_vector=data.draw(
            st.one_of(
                st.just(""),
                st.sampled_from(
                    ["1,0", "SDXL-LyC-MIDALL", "1," * 20 + "x", "nan," * 21, "1e999" + ",0" * 20]
                ),
                st.text(max_size=20),
            )
        ),
    )
    _status(lambda: stub.SubmitJob(request, timeout=DEADLINE))
    chunks = [
        pb.UploadChunk(job=request if i == 0 else None, data=data.draw(st.binary(max_size=2000)))
        for i in range(data.draw(st.integers(0, 3)))
    ]
    _status(lambda: stub.UploadDataset(iter(chunks), timeout=DEADLINE))
    _still_answers(d, stub)


@FUZZ
@given(data=st.data())
def test_file_calls(api, data):
    d, stub, _, job, paths = api
    path = data.draw(_texts(paths))
    _status(
        lambda: stub.GetSample(pb.GetSampleRequest(path=path, max_size=data.draw(INT32)), timeout=DEADLINE)
    )
    by_event = pb.GetSampleRequest(
        job_id=data.draw(st.one_of(st.just(job.id), _texts(paths))),
        seq=data.draw(INT64),
        max_size=data.draw(INT32),
    )
    _status(lambda: stub.GetSample(by_event, timeout=DEADLINE))
    _status(lambda: stub.DownloadArtifact(pb.ArtifactRef(path=path), timeout=DEADLINE))
    _still_answers(d, stub)


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_lora_tool_calls(api, data):
    """These run in the tool worker: bad files must come back as refusals, not as its crashes."""
    d, stub, _, _, paths = api
    lora = [p for p in paths if p.endswith(".safetensors")]
    path = data.draw(st.one_of(st.sampled_from(lora), _texts(paths)))
    vector = data.draw(
        st.one_of(
            st.sampled_from(["SDXL-LyC-MIDALL", "1" + ",0" * 20, "", "1,0", "-1" + ",0" * 20]),
            st.text(max_size=20),
        )
    )
    _status(lambda: stub.BlockLayout(pb.ArtifactRef(path=path), timeout=DEADLINE))
    _status(lambda: stub.Chop(pb.ChopRequest(path=path, vector=vector), timeout=DEADLINE))
    _status(
        lambda: stub.Resize(
            pb.ResizeRequest(
                path=path,
                recipe=data.draw(
                    st.one_of(
                        st.just(""),
                        st.sampled_from(["fro_ckpt=1,thr=-3.55", "fro=0.5", "x", "rank=-1"]),
                        st.text(max_size=20),
                    )
                ),
            ),
            timeout=DEADLINE,
        )
    )
    preview = pb.PreviewRequest(
        path=path,
        vector=vector,
        prompts=data.draw(st.lists(st.text(max_size=30), max_size=3)),
        seed=data.draw(INT64),
        max_size=data.draw(INT32),
    )
    code = None
    try:
        stub.Preview(preview, timeout=DEADLINE)
    except grpc.RpcError as e:
        code = e.code()
    # This daemon runs no training worker: a valid preview request is UNAVAILABLE, said as much.
    assert code in CLEAR | {grpc.StatusCode.UNAVAILABLE}, code
    _still_answers(d, stub)


@pytest.mark.slow
def test_previews_with_hostile_prompts_are_refused_or_rendered(home, daemons):
    """Previews run in the training worker: a prompt that asks for a huge picture or a seed no
    generator takes must be refused up front, not tie up (or kill) the worker."""
    d = daemons(home, "--workers", "1", "--quiet-seconds", "3600", env={"OMP_NUM_THREADS": "1"})
    make_dataset(home / "inbox" / "cats", settings={"max_train_steps": 1, "resize_recipe": ""})
    stub = rpc.LoradropStub(grpc.insecure_channel(d.connect))
    job = stub.SubmitJob(pb.SubmitJobRequest(dataset="cats"), timeout=DEADLINE)
    from loradrop.testing import wait_for

    final = wait_for(
        lambda: (j := stub.GetJob(pb.JobRef(job_id=job.id), timeout=DEADLINE)).state == pb.DONE and j.final,
        timeout=120,
        what="the job",
    )
    too_large = ["x --w 100000 --h 100000", "x --w 64 --h 99999999", "x --w 4096 --h 4096"]
    odd = [
        "x --d 99999999999999999999999 --w 64 --h 64 --s 1",
        "x --d -99999999999999999999 --w 64 --h 64 --s 1",
        "x --w -5 --h 64 --s 1",
        "x --s 100000000 --w 64 --h 64 --s 1",
        "x --l nan --w 64 --h 64 --s 1",
        "x --l 1e308 --w 64 --h 64 --s 1",
        "--w 64 --h 64 --s 1 --n " + "y" * 5000,
        "\0 --w 64 --h 64 --s 1 --bogus 3",
    ]
    for line in too_large:
        assert (
            _status(lambda: stub.Preview(pb.PreviewRequest(path=final, prompts=[line]), timeout=DEADLINE))
            == grpc.StatusCode.INVALID_ARGUMENT
        ), line
    for line in odd:  # rendered (an odd option is ignored, as in training) or refused, quickly either way
        _status(
            lambda: stub.Preview(pb.PreviewRequest(path=final, prompts=[line], seed=-(2**63)), timeout=60)
        )
    _still_answers(d, stub)
    assert stub.Status(pb.StatusRequest(), timeout=DEADLINE).workers[0].state in ("idle", "busy")


METHODS = [m.name for m in pb.DESCRIPTOR.services_by_name["Loradrop"].methods]


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    garbage=st.one_of(
        st.binary(max_size=200),
        st.sampled_from([b"\xff", b"\x0a\xff\xff\xff\xff\x0f", b"\x08" * 50, b"\x12\x05abc"]),
    )
)
def test_raw_bytes_that_are_not_a_message(api, garbage):
    """Not the stubs' bytes: whatever arrives, a request that does not parse is INVALID_ARGUMENT."""
    d, stub, channel, _, _ = api
    for method in METHODS:
        descriptor = pb.DESCRIPTOR.services_by_name["Loradrop"].methods_by_name[method]
        name = f"/loradrop.v1.Loradrop/{method}"
        if descriptor.client_streaming:
            call = lambda: channel.stream_unary(name)(iter([garbage, garbage]), timeout=DEADLINE)  # noqa: E731
        elif descriptor.server_streaming:
            call = lambda: channel.unary_stream(name)(garbage, timeout=DEADLINE)  # noqa: E731
        else:
            call = lambda: channel.unary_unary(name)(garbage, timeout=DEADLINE)  # noqa: E731
        if method == "StreamEvents":
            continue  # a garbage request may parse as follow=true: a stream that never ends, by design
        _status(call)
    _still_answers(d, stub)


def test_oversized_requests_are_refused_whole(api):
    d, stub, _, _, _ = api
    big = "x" * (70 << 20)  # over the daemon's 64 MB message limit
    with pytest.raises(grpc.RpcError) as e:
        stub.SubmitJob(pb.SubmitJobRequest(dataset="cats", overrides=[big]), timeout=60)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    many = [f"max_train_steps={i}" for i in range(200_000)]  # under the limit, but 200,000 settings
    assert (
        _status(lambda: stub.SubmitJob(pb.SubmitJobRequest(dataset="cats", overrides=many), timeout=60))
        == grpc.StatusCode.OK
    )
    _still_answers(d, stub)


def _tar(*members: tarfile.TarInfo, data: bytes = b"x") -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for m in members:
            tar.addfile(m, io.BytesIO(data) if m.isreg() else None)
    return out.getvalue()


def _member(name: str, kind=tarfile.REGTYPE, linkname: str = "", size: int = 1) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, linkname, size if kind == tarfile.REGTYPE else 0
    return info


@pytest.mark.parametrize(
    "stream",
    [
        pytest.param(lambda: [_tar(_member("../../evil"))], id="dotdot"),
        pytest.param(lambda: [_tar(_member("link", tarfile.SYMTYPE, "/etc/passwd"))], id="symlink-out"),
        pytest.param(lambda: [_tar(_member("link", tarfile.SYMTYPE, "../../state.sqlite"))], id="symlink-up"),
        pytest.param(lambda: [_tar(_member("hard", tarfile.LNKTYPE, "/etc/passwd"))], id="hardlink-out"),
        pytest.param(lambda: [_tar(_member("dev", tarfile.CHRTYPE))], id="device"),
        pytest.param(lambda: [_tar(_member("a.png"))[:700]], id="cut-short"),
        pytest.param(lambda: [b"\x1f\x8b" + os.urandom(600)], id="gzip-garbage"),
    ],
)
def test_hostile_uploads_are_refused_and_leave_nothing(api, stream):
    d, stub, _, _, _ = api
    home = Path(stub.Status(pb.StatusRequest(), timeout=DEADLINE).home)
    before = set(os.listdir(home / "inbox"))
    messages = [
        pb.UploadChunk(job=pb.SubmitJobRequest(dataset="evil") if i == 0 else None, data=chunk)
        for i, chunk in enumerate(stream())
    ]
    with pytest.raises(grpc.RpcError) as e:
        stub.UploadDataset(iter(messages), timeout=DEADLINE)
    assert e.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED), (
        e.value.details()
    )
    assert set(os.listdir(home / "inbox")) == before, "a refused upload left files in the inbox"
    assert not (home.parent / "evil").exists() and not Path("/etc/evil").exists()
    _still_answers(d, stub)


def test_an_absolute_name_in_an_upload_lands_inside_its_folder(api):
    d, stub, _, _, _ = api
    messages = [pb.UploadChunk(job=pb.SubmitJobRequest(dataset="abs"), data=_tar(_member("/etc/evil-abs")))]
    job = stub.UploadDataset(iter(messages), timeout=DEADLINE)
    assert (Path(job.dataset) / "etc" / "evil-abs").is_file() and not Path("/etc/evil-abs").exists()
    stub.CancelJob(pb.JobRef(job_id=job.id), timeout=DEADLINE)


def test_health_and_reflection_answer_junk_clearly(api):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    d, stub, channel, _, _ = api
    health = health_pb2_grpc.HealthStub(channel)
    assert (
        health.Check(health_pb2.HealthCheckRequest(service=""), timeout=DEADLINE).status
        == health_pb2.HealthCheckResponse.SERVING
    )
    with pytest.raises(grpc.RpcError) as e:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service" * 100), timeout=DEADLINE)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    asks = [
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="no.such.Symbol"),
        reflection_pb2.ServerReflectionRequest(file_by_filename="../../etc/passwd"),
    ]
    for reply in reflection.ServerReflectionInfo(iter(asks), timeout=DEADLINE):
        assert reply.HasField("error_response")
    _still_answers(d, stub)
