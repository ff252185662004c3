"""SDXL as diffusers/transformers modules, built empty from configs and filled from a checkpoint.

`load_sdxl` reads a single-file SGM checkpoint (as SDXL base, Pony Diffusion V6 XL and other
fine-tunes ship) or a diffusers folder, and what its UNet predicts (ε, or v for NoobAI-XL v-pred
and other v-prediction fine-tunes). Single files are streamed: modules are built with their
parameters on the meta device, then each tensor is read, renamed through the key map, cast, and
put in place, so the process never holds a second copy of the model.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import nn

from loradrop.errors import UserError

from ..recipe import Recipe
from ..tensorfile import TensorFile
from . import keymap
from .configs import SDXLConfig, sdxl_config, tokenizers

log = logging.getLogger(__name__)

COMPONENTS = ("unet", "vae", "te1", "te2")
CONFIG_METADATA_KEY = "loradrop.sdxl_config"
_PREFIXES = {
    "unet": keymap.UNET_PREFIX,
    "vae": keymap.VAE_PREFIX,
    "te1": keymap.TE1_PREFIX,
    "te2": keymap.TE2_PREFIX,
}
_NAMES = {"unet": "UNet", "vae": "VAE", "te1": "text encoder 1", "te2": "text encoder 2"}


# ComfyUI's marks of a v-prediction checkpoint: empty tensors beside the weights. `ztsnr` counts
# only with `v_pred` (comfy/supported_models.py SDXL.model_type, which ComfyUI writes and reads).
V_PRED_KEY, ZTSNR_KEY = "v_pred", "ztsnr"


@dataclass(frozen=True)
class Prediction:
    """What the UNet was trained to predict, and on which noise schedule."""

    v: bool = False  # v-prediction; else ε
    ztsnr: bool = False  # the zero-terminal-SNR schedule (engine/train/noise.py)

    @classmethod
    def from_keys(cls, keys) -> "Prediction":
        v = V_PRED_KEY in keys
        return cls(v=v, ztsnr=v and ZTSNR_KEY in keys)

    @classmethod
    def trained_with(cls, metadata: Mapping[str, str], base: "Prediction") -> "Prediction":
        """What a LoRA's run trained its base to predict, from the LoRA's kohya metadata
        (ss_v_parameterization, ss_zero_terminal_snr); `base`'s when the file does not say."""
        if "ss_v_parameterization" not in metadata:
            return base
        return cls(
            v=metadata["ss_v_parameterization"] == "True",
            ztsnr=metadata.get("ss_zero_terminal_snr") == "True",
        )

    def marks(self) -> dict[str, torch.Tensor]:
        """The keys a checkpoint of this kind carries, as ComfyUI saves them."""
        names = ([V_PRED_KEY] if self.v else []) + ([ZTSNR_KEY] if self.v and self.ztsnr else [])
        return {name: torch.tensor([]) for name in names}


@dataclass
class SDXL:
    """The loaded model. Components not asked for are None."""

    config: SDXLConfig
    source: Path
    unet: nn.Module | None = None
    vae: nn.Module | None = None
    te1: nn.Module | None = None
    te2: nn.Module | None = None
    vae_id: str = ""  # sha256 of the VAE weights: the latent cache's model key
    prediction: Prediction = Prediction()  # as the checkpoint says; a recipe may override it (prediction_for)
    unet_names: keymap.UNetNames = field(init=False)

    def __post_init__(self):
        self.unet_names = keymap.UNetNames(self.config.unet)

    @property
    def tokenizers(self):
        return tokenizers()

    def component(self, name: str) -> nn.Module | None:
        return getattr(self, name)

    def prediction_for(self, recipe: Recipe) -> Prediction:
        """The checkpoint's prediction, unless the recipe sets kohya's flags (v_parameterization,
        zero_terminal_snr) to true or false: a v-pred fine-tune without ComfyUI's marks exists."""
        v = self.prediction.v if recipe.v_parameterization == "auto" else recipe.v_parameterization
        ztsnr = self.prediction.ztsnr if recipe.zero_terminal_snr == "auto" else recipe.zero_terminal_snr
        if ztsnr and not v:
            # At zero SNR x_t is the noise itself: ε is given away and says nothing of x0.
            raise UserError(
                f"the recipe trains {self.source} with zero terminal SNR but epsilon prediction, which cannot denoise "
                "pure noise; set v_parameterization = true, or zero_terminal_snr = false."
            )
        return Prediction(v=v, ztsnr=ztsnr)


def build_empty(config: SDXLConfig, components: Iterable[str] = COMPONENTS) -> dict[str, nn.Module]:
    """Build modules with parameters on the meta device and real (computed) buffers."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    makers = {
        "unet": lambda: UNet2DConditionModel.from_config(config.unet),
        "vae": lambda: AutoencoderKL.from_config(config.vae),
        "te1": lambda: CLIPTextModel(CLIPTextConfig(**config.te1)),
        "te2": lambda: CLIPTextModelWithProjection(CLIPTextConfig(**config.te2)),
    }
    out = {}
    with init_empty_weights(include_buffers=False):
        for name in components:
            out[name] = makers[name]().eval().requires_grad_(False)
    return out


def component_map(name: str, config: SDXLConfig, module: nn.Module) -> keymap.ComponentMap:
    keys = list(module.state_dict().keys())
    if name == "unet":
        return keymap.unet_map(config.unet, keys)
    if name == "vae":
        return keymap.vae_map(config.vae, keys)
    if name == "te1":
        return keymap.te1_map(keys)
    return keymap.te2_map(keys)


def load_sdxl(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    vae_dtype: torch.dtype = torch.float32,
    components: Iterable[str] = COMPONENTS,
) -> SDXL:
    """Load an SDXL checkpoint. `dtype` is for the UNet and text encoders; the VAE has its own
    (fp32 by default: SDXL's VAE overflows in fp16)."""
    path = Path(path).expanduser()
    components = tuple(components)
    if path.is_dir():
        return _load_diffusers_folder(path, dtype, vae_dtype, components)
    with TensorFile(path, what="an SDXL checkpoint (.safetensors)") as tf:
        check_is_sdxl(tf, components)
        config = _config_for(tf)
        model = SDXL(config=config, source=path, prediction=Prediction.from_keys(tf.infos))
        modules = build_empty(config, components)
        for name, module in modules.items():
            vae_hash = hashlib.sha256() if name == "vae" else None
            _stream_into(tf, name, config, module, vae_dtype if name == "vae" else dtype, vae_hash)
            setattr(model, name, module)
            if vae_hash is not None:
                model.vae_id = vae_hash.hexdigest()
    return model


def _config_for(tf: TensorFile) -> SDXLConfig:
    """The bundled SDXL configs, unless the file names its own (the tiny twin does)."""
    text = tf.metadata.get(CONFIG_METADATA_KEY)
    return SDXLConfig.from_json(text) if text else sdxl_config()


def _stream_into(
    tf: TensorFile, name: str, config: SDXLConfig, module: nn.Module, dtype: torch.dtype, hasher
) -> None:
    cmap = component_map(name, config, module)
    targets = dict(module.named_parameters())
    targets.update(module.named_buffers())
    filled: set[str] = set()
    prefix = _PREFIXES[name]
    for key in sorted((k for k in tf.keys() if k.startswith(prefix)), key=lambda k: tf.infos[k].start):
        if key not in cmap.by_sgm:
            if key not in keymap.IGNORED_SGM_KEYS:
                log.warning(
                    "%s: ignoring tensor %s, which SDXL's %s does not have", tf.path, key, _NAMES[name]
                )
            continue
        raw = tf.read(key)
        if hasher is not None:
            hasher.update(key.encode())
            hasher.update(raw.reshape(-1).view(torch.uint8).numpy().data)
        for dkey, tensor in cmap.to_diffusers(key, raw):
            want = targets[dkey]
            if tuple(tensor.shape) != tuple(want.shape):
                raise UserError(
                    f"{tf.path} has tensor {key} of shape {list(raw.shape)}, which does not fit SDXL's "
                    f"{_NAMES[name]}; expected an SDXL base checkpoint."
                )
            _assign(module, dkey, tensor.to(dtype) if tensor.is_floating_point() else tensor)
            filled.add(dkey)
        del raw
    missing = [k for k in cmap.by_diffusers if k not in filled]
    if missing:
        sgm = cmap.by_diffusers[missing[0]].sgm
        raise UserError(
            f"{tf.path} lacks {len(missing)} tensors of SDXL's {_NAMES[name]} (the first is {sgm}); "
            "the file is incomplete or not an SDXL base checkpoint."
        )


def _assign(module: nn.Module, key: str, tensor: torch.Tensor) -> None:
    owner_path, _, attr = key.rpartition(".")
    owner = module.get_submodule(owner_path) if owner_path else module
    if attr in owner._parameters:
        owner._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    else:
        owner._buffers[attr] = tensor


# ------------------------------------------------------------------ what kind of file is this?

_LORA_MARKS = ("lora_unet_", "lora_te", ".lora_down.", ".lora_A.", ".hada_w1", ".lokr_w1", "lora_up.weight")


def check_is_sdxl(tf: TensorFile, components: Iterable[str] = COMPONENTS) -> None:
    """Refuse, in one sentence, anything that is not an SDXL base checkpoint."""
    keys = tf.keys()
    path = tf.path

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if any(m in k for k in keys[:2000] for m in _LORA_MARKS):
        raise UserError(f"{path} is a LoRA, not a base model; pass an SDXL checkpoint as the model.")
    if has("double_blocks.") or has("model.diffusion_model.double_blocks.") or has("single_blocks."):
        raise UserError(
            f"{path} is a Flux checkpoint; loradrop trains on SDXL and needs an SDXL base checkpoint."
        )
    if has("cond_stage_model.transformer."):
        raise UserError(
            f"{path} is a Stable Diffusion 1.x checkpoint; loradrop needs an SDXL base checkpoint."
        )
    if has("cond_stage_model.model."):
        raise UserError(
            f"{path} is a Stable Diffusion 2.x checkpoint; loradrop needs an SDXL base checkpoint."
        )
    if has("model.diffusion_model.joint_blocks."):
        raise UserError(f"{path} is a Stable Diffusion 3 checkpoint; loradrop needs an SDXL base checkpoint.")
    if has("conditioner.embedders.0.model.") and not has(keymap.TE2_PREFIX):
        raise UserError(f"{path} is the SDXL refiner; loradrop trains on an SDXL base checkpoint.")
    if not (has(keymap.UNET_PREFIX) and has(keymap.TE1_PREFIX) and has(keymap.TE2_PREFIX)):
        raise UserError(
            f"{path} is not an SDXL checkpoint: expected model.diffusion_model.* and "
            "conditioner.embedders.* tensors in a single-file SDXL model."
        )
    if "vae" in components and not has(keymap.VAE_PREFIX):
        raise UserError(
            f"{path} has no VAE (first_stage_model.* tensors); use a checkpoint with its VAE baked in."
        )


# ------------------------------------------------------------------ diffusers folders


def _load_diffusers_folder(path: Path, dtype, vae_dtype, components) -> SDXL:
    import json

    index = path / "model_index.json"
    if not index.exists():
        raise UserError(
            f"{path} is a folder without model_index.json; expected an SDXL .safetensors file or a diffusers folder."
        )
    kind = json.loads(index.read_text()).get("_class_name", "")
    if "XL" not in kind:
        raise UserError(f"{path} holds a {kind or 'non-SDXL'} pipeline; loradrop needs an SDXL base model.")
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    loaders = {
        "unet": lambda: UNet2DConditionModel.from_pretrained(
            path, subfolder="unet", torch_dtype=dtype, local_files_only=True
        ),
        "vae": lambda: AutoencoderKL.from_pretrained(
            path, subfolder="vae", torch_dtype=vae_dtype, local_files_only=True
        ),
        "te1": lambda: CLIPTextModel.from_pretrained(
            path, subfolder="text_encoder", dtype=dtype, local_files_only=True
        ),
        "te2": lambda: CLIPTextModelWithProjection.from_pretrained(
            path, subfolder="text_encoder_2", dtype=dtype, local_files_only=True
        ),
    }
    parts = {}
    for name in components:
        try:
            parts[name] = loaders[name]().eval().requires_grad_(False)
        except (OSError, ValueError) as e:
            raise UserError(f"{path} has no loadable {_NAMES[name]} ({str(e).splitlines()[0]}).") from None
    config = SDXLConfig(
        unet=dict(parts["unet"].config) if "unet" in parts else sdxl_config().unet,
        vae=dict(parts["vae"].config) if "vae" in parts else sdxl_config().vae,
        te1=parts["te1"].config.to_dict() if "te1" in parts else sdxl_config().te1,
        te2=parts["te2"].config.to_dict() if "te2" in parts else sdxl_config().te2,
    )
    model = SDXL(config=config, source=path, prediction=_folder_prediction(path), **parts)
    if model.vae is not None:
        h = hashlib.sha256()
        for k, v in sorted(model.vae.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().to(torch.float16).reshape(-1).view(torch.uint8).numpy().data)
        model.vae_id = h.hexdigest()
    return model


def _folder_prediction(path: Path) -> Prediction:
    """A diffusers folder says it in its scheduler config, where diffusers' pipelines read it."""
    import json

    config_path = path / "scheduler" / "scheduler_config.json"
    if not config_path.exists():
        return Prediction()
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{config_path} cannot be read as JSON ({e}); fix it or remove it.") from None
    v = config.get("prediction_type") == "v_prediction"
    return Prediction(v=v, ztsnr=v and bool(config.get("rescale_betas_zero_snr")))
