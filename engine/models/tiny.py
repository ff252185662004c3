"""The tiny twins: SDXL's topology at tiny widths, as real single-file SGM checkpoints.

The random twin has fixed random weights, drawn per tensor from a generator seeded by the
tensor's name, so the file is the same on every machine and every torch version; tests where
only the topology matters use it. The learned twin (engine/twin/build.py) has the random twin's
text encoders and a VAE and UNet trained to draw a small world of coloured shapes; it ships with
the package and is the embedded default model: with no base model given, the CLI, the daemon,
the demo and the tests that check learning use it.

Either twin can be written as a v-prediction (and zero-terminal-SNR) checkpoint: the same
weights with ComfyUI's `v_pred` / `ztsnr` marks, for the tests of detection, target and sampling.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import torch

from .. import tensorfile
from .configs import SDXLConfig, tiny_config
from .sdxl import CONFIG_METADATA_KEY, Prediction, build_empty, component_map

TINY_SEED = 20240601
TINY_VERSION = "2"


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


def make_tiny(
    path: str | os.PathLike, seed: int = TINY_SEED, *, prediction: Prediction = Prediction()
) -> Path:
    """Write the twin as an fp16 SGM single-file checkpoint, as real SDXL fine-tunes ship;
    `prediction` marks it as a v-prediction (zero-terminal-SNR) model, as NoobAI-XL v-pred is."""
    config = tiny_config()
    states = {
        name: {k: _init_tensor(f"{name}.{k}", v.shape, seed) for k, v in module.state_dict().items()}
        for name, module in build_empty(config).items()
    }
    return write_checkpoint(
        path, config, states, {"loradrop.tiny_twin": f"seed={seed} version={TINY_VERSION}"}, prediction
    )


def write_checkpoint(
    path: str | os.PathLike,
    config: SDXLConfig,
    states: dict[str, dict[str, torch.Tensor]],
    metadata: dict[str, str],
    prediction: Prediction = Prediction(),
) -> Path:
    """Diffusers-named state dicts of the four components, written as one fp16 SGM file that
    names its own config (so `load_sdxl` builds the right widths), with `prediction`'s marks."""
    sgm: dict[str, torch.Tensor] = {}
    for name, module in build_empty(config, states.keys()).items():
        sgm.update(component_map(name, config, module).to_sgm(states[name]))
    sgm = {k: v.detach().to(torch.float16).contiguous() for k, v in sgm.items()}
    sgm.update(prediction.marks())
    path = Path(path)
    tensorfile.write(path, sgm, {CONFIG_METADATA_KEY: config.to_json(), **metadata})
    return path


def default_random_path() -> Path:
    """The random twin, written once into the user's cache and reused."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "loradrop"
    path = cache / f"tiny-sdxl-v{TINY_VERSION}.safetensors"
    if not path.exists():
        make_tiny(path)
    return path


LEARNED_TWIN = Path(__file__).parent / "data" / "twin" / "learned-twin.safetensors"


def default_model_path() -> Path:
    """The embedded default model: the learned twin, shipped with the package (docs/twin.md)."""
    return LEARNED_TWIN
