"""The tiny twin: SDXL's topology at tiny widths, written as a real single-file SGM checkpoint.

It is the embedded default model: with no base model given, the CLI, the daemon, the demo and
the tests train on it, and everything runs on a CPU in seconds. Weights are drawn per tensor
from a generator seeded by the tensor's name, so the file is the same on every machine and
every torch version.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import torch

from .. import tensorfile
from .configs import tiny_config
from .sdxl import CONFIG_METADATA_KEY, build_empty, component_map

TINY_SEED = 20240601
TINY_VERSION = "1"


def _init_tensor(name: str, shape: torch.Size, seed: int) -> torch.Tensor:
    leaf = name.rsplit(".", 1)[-1]
    module = name.rsplit(".", 2)[-2] if name.count(".") else ""
    if leaf == "bias":
        return torch.zeros(shape)
    if len(shape) == 1:  # norm scales
        return torch.ones(shape)
    g = torch.Generator().manual_seed(seed ^ zlib.crc32(name.encode()))
    noise = torch.randn(shape, generator=g)
    if "embedding" in module or "embedding" in name:
        return noise * 0.02
    fan_in = 1
    for d in shape[1:]:
        fan_in *= d
    return noise / fan_in**0.5


def make_tiny(path: str | os.PathLike, seed: int = TINY_SEED) -> Path:
    """Write the twin as an fp16 SGM single-file checkpoint, as real SDXL fine-tunes ship."""
    config = tiny_config()
    modules = build_empty(config)
    sgm: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        cmap = component_map(name, config, module)
        state = {k: _init_tensor(f"{name}.{k}", v.shape, seed) for k, v in module.state_dict().items()}
        sgm.update(cmap.to_sgm(state))
    sgm = {k: v.to(torch.float16) for k, v in sgm.items()}
    metadata = {CONFIG_METADATA_KEY: config.to_json(), "loradrop.tiny_twin": f"seed={seed} version={TINY_VERSION}"}
    path = Path(path)
    tensorfile.write(path, sgm, metadata)
    return path


def default_model_path() -> Path:
    """The embedded default: the twin, written once into the user's cache and reused."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "loradrop"
    path = cache / f"tiny-sdxl-v{TINY_VERSION}.safetensors"
    if not path.exists():
        make_tiny(path)
    return path
