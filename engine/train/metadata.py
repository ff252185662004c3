"""The metadata kohya writes into a LoRA: `ss_*` training facts and the SAI `modelspec.*` card.

Tools people use to inspect LoRAs (A1111's metadata view, Civitai, ComfyUI nodes) read these keys,
so they follow kohya's names and string formats. Values are strings, as safetensors requires.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import json
import time
import uuid
from pathlib import Path
from typing import Any, Mapping, Sequence

import tomli_w

from ..models.sdxl import Prediction
from ..recipe import Recipe
from .network import Preset

BASE_MODEL_VERSION = "sdxl_base_v1-0"  # A1111 reads any "sdxl_" value as an SDXL LoRA
ARCHITECTURE = "stable-diffusion-xl-v1-base/lora"


def training_metadata(
    recipe: Recipe,
    *,
    captions: Sequence[str],
    buckets: Sequence[tuple[int, int]],
    dataset_dir: Path,
    num_batches_per_epoch: int,
    world_size: int,
    model_path: str | None,
    model_hashes: tuple[str, str] | None,
    started_at: float,
    dataset_dirs: Mapping[str, tuple[int, int]] | None = None,
    prediction: Prediction = Prediction(),
) -> dict[str, str]:
    """Everything known when training starts; per-save values are added by `at_save`.
    `dataset_dirs`: folder name -> (repeats, images), kohya's ss_dataset_dirs; `captions` is the
    epoch's list, repeats included. `prediction`: what the run trained the UNet to predict
    (SDXL.prediction_for), so a UI samples the LoRA's base as it was trained."""
    if dataset_dirs is None:
        dataset_dirs = {
            dataset_dir.name: (recipe.dataset_repeats, len(captions) // max(1, recipe.dataset_repeats))
        }
    optimizer = recipe.optimizer_type
    if recipe.optimizer_args:
        optimizer += f"({','.join(f'{k}={v}' for k, v in recipe.optimizer_args.items())})"
    num_epochs = -(
        -recipe.max_train_steps
        * recipe.gradient_accumulation_steps
        * world_size
        // max(1, num_batches_per_epoch)
    )
    network_args = {
        # The module set really adapted, as the text of a LyCORIS preset file (network args are
        # strings): recipe.preset says "full", but LyCORIS' "full" adapts more (see Preset).
        "preset": tomli_w.dumps(dataclasses.asdict(Preset.for_recipe(recipe))),
        "conv_dim": str(recipe.conv_dim),
        "conv_alpha": str(recipe.conv_alpha),
        "rank_dropout": str(recipe.rank_dropout),
        "module_dropout": str(recipe.module_dropout),
        "use_tucker": str(recipe.use_tucker),
        "use_scalar": str(recipe.use_scalar),
        "algo": recipe.algo,
        "dora_wd": str(recipe.dora_wd),
        "wd_on_output": str(recipe.wd_on_output),
        "train_norm": str(recipe.train_norm),
        "factor": str(recipe.factor),
        "decompose_both": str(recipe.decompose_both),
        "full_matrix": str(recipe.full_matrix),
    }
    bucket_counts = collections.Counter(buckets)
    meta: dict[str, Any] = {
        "ss_session_id": uuid.uuid4().int % 2**32,
        "ss_training_started_at": started_at,
        "ss_output_name": recipe.output_name,
        "ss_learning_rate": recipe.learning_rate,
        "ss_text_encoder_lr": recipe.text_encoder_lr,
        "ss_unet_lr": recipe.unet_lr,
        "ss_num_train_images": sum(n * count for n, count in dataset_dirs.values()),
        "ss_num_reg_images": 0,
        "ss_num_batches_per_epoch": num_batches_per_epoch,
        "ss_num_epochs": num_epochs,
        "ss_gradient_checkpointing": recipe.gradient_checkpointing,
        "ss_gradient_accumulation_steps": recipe.gradient_accumulation_steps,
        "ss_max_train_steps": recipe.max_train_steps,
        "ss_lr_warmup_steps": recipe.lr_warmup_steps,
        "ss_lr_scheduler": recipe.lr_scheduler,
        "ss_network_module": recipe.network_module,
        "ss_network_dim": recipe.network_dim,
        "ss_network_alpha": recipe.network_alpha,
        "ss_network_dropout": recipe.network_dropout,
        "ss_network_args": json.dumps(network_args),
        "ss_mixed_precision": recipe.mixed_precision,
        "ss_full_fp16": False,
        "ss_v2": False,
        "ss_base_model_version": BASE_MODEL_VERSION,
        "ss_clip_skip": None,
        "ss_max_token_length": None,
        "ss_cache_latents": recipe.cache_latents,
        "ss_seed": recipe.seed,
        "ss_lowram": False,
        "ss_noise_offset": None,
        "ss_multires_noise_iterations": recipe.multires_noise_iterations,
        "ss_multires_noise_discount": recipe.multires_noise_discount,
        "ss_adaptive_noise_scale": None,
        "ss_v_parameterization": prediction.v,
        "ss_zero_terminal_snr": prediction.ztsnr,
        "ss_training_comment": None,
        "ss_sd_scripts_commit_hash": "loradrop",
        "ss_optimizer": optimizer,
        "ss_max_grad_norm": recipe.max_grad_norm,
        "ss_caption_dropout_rate": recipe.caption_dropout_rate,
        "ss_caption_dropout_every_n_epochs": 0,
        "ss_caption_tag_dropout_rate": recipe.caption_tag_dropout_rate,
        "ss_face_crop_aug_range": None,
        "ss_prior_loss_weight": 1.0,
        "ss_min_snr_gamma": None,
        "ss_scale_weight_norms": None,
        "ss_batch_size_per_device": recipe.train_batch_size,
        "ss_total_batch_size": recipe.train_batch_size * recipe.gradient_accumulation_steps * world_size,
        "ss_resolution": f"({recipe.resolution}, {recipe.resolution})",
        "ss_color_aug": False,
        "ss_flip_aug": recipe.flip_aug,
        "ss_random_crop": False,
        "ss_shuffle_caption": recipe.shuffle_caption,
        "ss_enable_bucket": recipe.enable_bucket,
        "ss_bucket_no_upscale": False,
        "ss_min_bucket_reso": recipe.min_bucket_reso,
        "ss_max_bucket_reso": recipe.max_bucket_reso,
        "ss_keep_tokens": recipe.keep_tokens,
        "ss_dataset_dirs": json.dumps(
            {name: {"n_repeats": n, "img_count": count} for name, (n, count) in dataset_dirs.items()}
        ),
        "ss_reg_dataset_dirs": json.dumps({}),
        "ss_tag_frequency": json.dumps({dataset_dir.name: tag_frequency(captions)}),
        "ss_bucket_info": json.dumps(
            {
                "buckets": {
                    str(i): {"resolution": list(b), "count": n}
                    for i, (b, n) in enumerate(sorted(bucket_counts.items()))
                },
                "mean_img_ar_error": 0.0,
            }
        ),
    }
    if model_path:
        meta["ss_sd_model_name"] = Path(model_path).name
    if model_hashes:
        meta["ss_sd_model_hash"], meta["ss_new_sd_model_hash"] = model_hashes
    return {k: str(v) for k, v in meta.items()}


def at_save(meta: dict[str, str], recipe: Recipe, *, step: int, epoch: int, title: str) -> dict[str, str]:
    """The per-file values: steps and epoch so far, finish time, and the modelspec card."""
    now = time.time()
    out = dict(meta)
    out.update({"ss_training_finished_at": str(now), "ss_steps": str(step), "ss_epoch": str(epoch)})
    out.update(
        modelspec(
            title,
            now,
            resolution=f"{recipe.resolution}x{recipe.resolution}",
            prediction_type=_prediction_type(meta),
        )
    )
    return out


def _prediction_type(meta: Mapping[str, str]) -> str:
    """kohya's modelspec.prediction_type: "v" for a v-parameterization run, else "epsilon"."""
    return "v" if meta.get("ss_v_parameterization") == "True" else "epsilon"


def modelspec(
    title: str, when: float, *, resolution: str = "1024x1024", prediction_type: str = "epsilon"
) -> dict[str, str]:
    """The SAI model spec card of an SDXL LoRA, as kohya sd-scripts writes it (spec 1.0.1)."""
    return {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": ARCHITECTURE,
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": title,
        "modelspec.resolution": resolution,
        "modelspec.date": datetime.datetime.fromtimestamp(int(when)).isoformat(),
        "modelspec.prediction_type": prediction_type,
    }


def derived(meta: Mapping[str, str], name: str) -> dict[str, str]:
    """The metadata of a file made from another (resized, chopped): the source's, under its own
    name (A1111 lists LoRAs by ss_output_name, so two files must not share one) and with a card
    dated now, as kohya's own tools title and date the files they derive. A source without
    metadata gets the fields a LoRA browser needs to know it for an SDXL LoRA."""
    out = dict(meta)
    out["ss_output_name"] = name
    out.setdefault("ss_base_model_version", BASE_MODEL_VERSION)
    out.update(
        modelspec(
            name,
            time.time(),
            resolution=meta.get("modelspec.resolution", "1024x1024"),
            prediction_type=meta.get("modelspec.prediction_type", _prediction_type(meta)),
        )
    )
    return out


def derived_name(source: Path, suffix: str) -> str:
    """The source file's name with the deriving tool's suffix (what A1111 lists it as)."""
    return source.stem + suffix  # not ss_output_name: every step file of a run shares that one


def tag_frequency(captions: Sequence[str]) -> dict[str, int]:
    """How often each comma-separated tag appears, as kohya records it."""
    counts: collections.Counter[str] = collections.Counter()
    for caption in captions:
        counts.update(t.strip() for t in caption.split(",") if t.strip())
    return dict(counts)
