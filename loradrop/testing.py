"""The harness the tests and the benchmarks share: tiny real datasets, real daemon processes on a
temporary home, waiting. Not used by the program itself; it imports the client (grpc) and Pillow."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

from loradrop.fsutil import process_running
from loradrop.proto.client import Client, ClientError

# A recipe that trains in seconds on the tiny twin: 64 px, batch 1, no accumulation, few steps.
TINY_RECIPE = {
    "resolution": 64,
    "min_bucket_reso": 64,
    "max_bucket_reso": 128,
    "bucket_reso_steps": 32,
    "train_batch_size": 1,
    "gradient_accumulation_steps": 1,
    "max_train_steps": 4,
    "sample_every_n_steps": 0,
    "save_every_n_steps": 1,
    "log_with": "none",
    "suggest_by": "energy",  # effect is measured in tests/engine/test_pipeline.py and tests/twin, not in every job
    "mixed_precision": "no",
    "gradient_checkpointing": False,
    "max_data_loader_n_workers": 0,
    "conv_dim": 8,
    "conv_alpha": 4.0,
}


# Image sizes (w, h) that fall in several buckets, for tests of bucketing and batching.
BUCKET_SIZES = ((64, 64), (96, 64), (64, 96))


def toml_text(values: dict) -> str:
    import tomli_w

    return tomli_w.dumps(values)


def make_dataset(
    folder: Path,
    *,
    images: int = 2,
    size: int = 64,
    sizes: tuple[tuple[int, int], ...] | None = None,
    settings: dict | None = None,
    prompts: list[str] | None = None,
) -> Path:
    """Real PNGs with captions, and a loradrop.toml with the tiny recipe plus `settings` (the
    engine ignores that file; the daemon reads it). `sizes` cycles image sizes (w, h) for tests
    that need several buckets; otherwise every image is `size` square."""
    folder.mkdir(parents=True)
    for i in range(images):
        w, h = sizes[i % len(sizes)] if sizes else (size, size)
        image = Image.new("RGB", (w, h), (40 * i % 256, 120, 200 - 30 * i % 200))
        for x in range(0, min(w, h), 8):  # some structure, so the latents are not flat
            image.paste((255 - 20 * i % 256, 10 * x % 256, 60), (x, x // 2, x + 4, x // 2 + 4))
        image.save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a photo of zkw thing, number {i}")
    (folder / "loradrop.toml").write_text(toml_text({**TINY_RECIPE, **(settings or {})}))
    if prompts:
        (folder / "sample-prompts.txt").write_text("\n".join(prompts) + "\n")
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Daemon:
    """`loradrop daemon` as a child process; its output goes to a file shown when a test fails."""

    def __init__(
        self,
        home: Path,
        *args: str,
        connect: str | None = None,
        client_args: dict | None = None,
        env: dict | None = None,
    ):
        self.home, self.args, self.env = home, list(args), env
        self.connect = connect or f"unix:{home / 'daemon.sock'}"
        self.client_args = client_args or {}
        self.process: subprocess.Popen | None = None
        self.output = home.parent / f"{home.name}-daemon.out"

    def start(self, wait: bool = True) -> "Daemon":
        out = open(self.output, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "loradrop", "daemon", "--home", str(self.home), *self.args],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(self.env or {})},
        )
        out.close()
        if wait:
            self.wait_ready()
        return self

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.output.read_text(errors="replace") if self.output.exists() else ""

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the daemon exited with {self.process.returncode}:\n{self.log()}")
            try:
                with self.client() as c:
                    c.status()
                return
            except ClientError:
                time.sleep(0.1)
        raise AssertionError(f"the daemon did not answer in {timeout}s:\n{self.log()}")

    def client(self, **kwargs) -> Client:
        return Client(self.connect, **{**self.client_args, **kwargs})

    def stop(self, timeout: float = 60) -> int:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise AssertionError(f"the daemon did not stop on SIGTERM in {timeout}s:\n{self.log()}")
        return self.process.returncode

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()


def wait_for(predicate, timeout: float = 30, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


pid_alive = process_running  # a zombie (exited, not yet reaped) counts as gone


def dead_pid() -> int:
    """The pid of a process that has run and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def conditioning_dims(model) -> tuple[int, int]:
    """(context width, pooled width) a loaded SDXL's UNet expects: te1 + te2 hidden, te2 projection."""
    unet = model.config.unet
    return unet["cross_attention_dim"], unet["projection_class_embeddings_input_dim"] - 6 * unet[
        "addition_time_embed_dim"
    ]


def diffusers_pipeline(model, scheduler: str = "EulerDiscreteScheduler"):
    """A diffusers SDXL pipeline over a loaded model's own modules (no copies, no tokenizers):
    what `load_lora_weights` needs to load a LoRA the way diffusers users do."""
    import diffusers

    return diffusers.StableDiffusionXLPipeline(
        vae=model.vae,
        text_encoder=model.te1,
        text_encoder_2=model.te2,
        tokenizer=None,
        tokenizer_2=None,
        unet=model.unet,
        scheduler=getattr(diffusers, scheduler).from_config(model.config.scheduler),
    )


# The resource standing in for a GPU on a test cluster: CPU nodes that each take one worker.
TEST_GPU = "loradrop_gpu"


class RayTestCluster:
    """Ray's own multi-node test cluster on loopback: a head that runs no worker, and nodes that
    offer one TEST_GPU each (and the labels asked for). Ray's session files go to a short temporary
    folder (its sockets' paths must stay under the unix limit)."""

    def __init__(self, *labels: tuple[str, ...]):
        import tempfile

        # Every process of the test (nodes, daemons) inherits this: it makes Ray take the loopback
        # address for this machine's, which otherwise it finds on the network interface (ray#59110).
        # Ray reads it when first imported: a process that connects to the cluster itself (a bench)
        # must not have imported ray before this.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        from ray.cluster_utils import Cluster

        self.temp = tempfile.mkdtemp(prefix="ldray-", dir="/tmp")
        # Ray's own files outside its session (the address of "the current cluster") go here too,
        # not to a shared /tmp/ray that may not exist or may name another cluster.
        os.environ["RAY_TMPDIR"] = self.temp
        os.mkdir(os.path.join(self.temp, "ray"))  # Ray writes that file there but does not make it
        self.cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 1,
                "node_ip_address": "127.0.0.1",
                "temp_dir": self.temp,
                "include_dashboard": False,
                # A node killed outright is declared dead in seconds, not Ray's default half-minute.
                "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3},
            },
        )
        self.labels: dict = {}  # node alive -> the labels it was given, in the order they were added
        for node_labels in labels:
            self.add(*node_labels)

    @property
    def nodes(self) -> list:
        """The worker nodes alive, in the order they were added."""
        return list(self.labels)

    @property
    def address(self) -> str:
        return self.cluster.address

    def add(self, *labels: str):
        node = self.cluster.add_node(
            num_cpus=1, node_ip_address="127.0.0.1", resources={TEST_GPU: 1, **{label: 1 for label in labels}}
        )
        self.cluster.wait_for_nodes()
        self.labels[node] = labels
        return node

    def kill(self, node) -> tuple[str, ...]:
        """The node's processes killed at once, as when its machine loses power; its labels."""
        self.cluster.remove_node(node, allow_graceful=False)
        return self.labels.pop(node)

    def node_of(self, short_id: str):
        return next(node for node in self.nodes if node.node_id.startswith(short_id))

    def shutdown(self) -> None:
        import shutil

        self.cluster.shutdown()
        if os.environ.get("RAY_TMPDIR") == self.temp:
            del os.environ["RAY_TMPDIR"]
        shutil.rmtree(self.temp, ignore_errors=True)
