"""v-prediction and zero-terminal-SNR bases (NoobAI-XL v-pred and its kin), on the tiny twin.

The twin is written with ComfyUI's `v_pred` / `ztsnr` marks; the tests check that it is read as
such, that the loss trains toward v on the rescaled schedule, that it samples to finite pictures,
that the LoRA's metadata says v, and that a recipe's kohya flags beat what the checkpoint says.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from loradrop.engine.data.latents import CachedLatent
from loradrop.engine.data.prompts import SamplePrompt
from loradrop.engine.kohya_args import convert_kohya
from loradrop.engine.models.sdxl import Prediction, load_sdxl
from loradrop.engine.models.tiny import make_tiny
from loradrop.engine.recipe import Recipe
from loradrop.engine.train import metadata
from loradrop.engine.train.conditioning import encode_text, size_ids, tokenize
from loradrop.engine.train.microbatch import TrainingData, generators, micro_batch_loss
from loradrop.engine.train.noise import add_noise, alphas_cumprod, multires_noise, training_target
from loradrop.engine.train.precision import Precision
from loradrop.engine.train.sampling import Render, rescale_guidance
from loradrop.errors import UserError

VPRED_ZTSNR = Prediction(v=True, ztsnr=True)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def vpred_path(tmp_path_factory):
    return make_tiny(
        tmp_path_factory.mktemp("vpred") / "tiny-vpred-ztsnr.safetensors", prediction=VPRED_ZTSNR
    )


@pytest.fixture(scope="module")
def vpred_model(vpred_path):
    return load_sdxl(vpred_path)


# ------------------------------------------------------------------ detection


def test_the_twin_is_written_with_comfyuis_marks_and_read_back_as_vpred_ztsnr(
    vpred_path, vpred_model, tiny_model, tmp_path
):
    with safe_open(str(vpred_path), "pt") as f:  # what ComfyUI's loader sees in the state dict
        assert {"v_pred", "ztsnr"} <= set(f.keys())
    assert vpred_model.prediction == VPRED_ZTSNR
    assert tiny_model.prediction == Prediction()  # the plain twin: epsilon, SD's schedule
    v_only = make_tiny(tmp_path / "v.safetensors", prediction=Prediction(v=True))
    assert load_sdxl(v_only, components=("unet",)).prediction == Prediction(v=True, ztsnr=False)
    # ComfyUI reads ztsnr only beside v_pred.
    assert Prediction.from_keys({"ztsnr", "model.diffusion_model.out.2.weight"}) == Prediction()


@pytest.mark.parametrize(
    "config, expected",
    [
        ({"prediction_type": "v_prediction", "rescale_betas_zero_snr": True}, VPRED_ZTSNR),
        ({"prediction_type": "v_prediction"}, Prediction(v=True)),
        ({"prediction_type": "epsilon"}, Prediction()),
        (None, Prediction()),
    ],
)
def test_a_diffusers_folder_says_it_in_its_scheduler_config(tmp_path, config, expected):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    if config is not None:
        (tmp_path / "scheduler").mkdir()
        (tmp_path / "scheduler" / "scheduler_config.json").write_text(
            json.dumps({"_class_name": "EulerDiscreteScheduler", **config})
        )
    assert load_sdxl(tmp_path, components=()).prediction == expected


# ------------------------------------------------------------------ recipe and from-kohya overrides


def test_a_recipe_override_beats_detection(vpred_model, tiny_model):
    assert vpred_model.prediction_for(Recipe()) == VPRED_ZTSNR  # "auto": the checkpoint's
    assert (
        vpred_model.prediction_for(Recipe(v_parameterization=False, zero_terminal_snr=False)) == Prediction()
    )
    assert vpred_model.prediction_for(Recipe(zero_terminal_snr=False)) == Prediction(v=True)
    assert tiny_model.prediction_for(Recipe(v_parameterization=True)) == Prediction(v=True)
    assert (
        tiny_model.prediction_for(
            Recipe().with_overrides(["v_parameterization=true", "zero_terminal_snr=true"])
        )
        == VPRED_ZTSNR
    )
    with pytest.raises(UserError, match="zero terminal SNR but epsilon prediction"):
        vpred_model.prediction_for(Recipe(v_parameterization=False))  # ztsnr still read off the file


def test_the_flags_are_kohyas_in_toml_and_from_kohya():
    recipe = Recipe.from_mapping({"v_parameterization": True, "zero_terminal_snr": "auto"})
    assert (recipe.v_parameterization, recipe.zero_terminal_snr) == (True, "auto")
    assert Recipe.from_mapping({}).to_dict()["v_parameterization"] == "auto"
    with pytest.raises(UserError, match="v_parameterization must be 'auto' or true or false, not 1"):
        Recipe.from_mapping({"v_parameterization": 1})
    with pytest.raises(UserError, match="needs v-prediction"):
        Recipe.from_mapping({"v_parameterization": False, "zero_terminal_snr": True})

    given = convert_kohya(
        "sdxl_train_network.py --network_module lycoris.kohya --v_parameterization --zero_terminal_snr"
    )
    assert (given.recipe.v_parameterization, given.recipe.zero_terminal_snr) == (
        True,
        True,
    ) and given.unsupported == []
    absent = convert_kohya("sdxl_train_network.py --network_module lycoris.kohya")
    assert (absent.recipe.v_parameterization, absent.recipe.zero_terminal_snr) == ("auto", "auto")
    assert any("--v_parameterization" in n and "read off the checkpoint" in n for n in absent.notes)


# ------------------------------------------------------------------ the schedule and the target


def test_the_ztsnr_schedule_ends_at_pure_noise_and_keeps_its_start():
    plain, rescaled = alphas_cumprod(), alphas_cumprod(zero_terminal_snr=True)
    assert plain[-1] > 0.004  # SD's schedule never reaches pure noise
    assert rescaled[-1] == 0.0
    assert torch.isclose(rescaled[0], plain[0], rtol=1e-6)
    assert bool((rescaled[1:] < rescaled[:-1]).all())
    # diffusers' rescale of the betas implies the same ᾱ (its training scheduler keeps the exact 0).
    from diffusers import DDPMScheduler

    theirs = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", rescale_betas_zero_snr=True
    ).alphas_cumprod
    torch.testing.assert_close(rescaled, theirs.float(), rtol=1e-5, atol=1e-7)


def test_the_v_target_on_one_timestep():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    ac = alphas_cumprod()
    t = torch.tensor([500])
    a = float(ac[500])
    v = training_target(x0, noise, t, ac, v_prediction=True)
    torch.testing.assert_close(v, a**0.5 * noise - (1 - a) ** 0.5 * x0)
    assert training_target(x0, noise, t, ac, v_prediction=False) is noise
    # v and x_t give back x0, as a v-prediction sampler recovers it.
    torch.testing.assert_close(
        a**0.5 * add_noise(x0, noise, t, ac) - (1 - a) ** 0.5 * v, x0, rtol=1e-5, atol=1e-5
    )
    # At the zero-SNR end x_t is the noise and v is −x0: nothing divides by zero.
    end = torch.tensor([999])
    ztsnr = alphas_cumprod(zero_terminal_snr=True)
    torch.testing.assert_close(training_target(x0, noise, end, ztsnr, v_prediction=True), -x0)
    torch.testing.assert_close(add_noise(x0, noise, end, ztsnr), noise)


@pytest.mark.parametrize(
    "twin, recipe, v",
    [
        ("vpred", Recipe(), True),
        ("vpred", Recipe(v_parameterization=False, zero_terminal_snr=False), False),
        ("plain", Recipe(), False),
        ("plain", Recipe(v_parameterization=True), True),
    ],
)
def test_the_training_loss_is_against_v_for_a_vpred_base(twin, recipe, v, vpred_model, tiny_model):
    """The micro-batch loss, recomputed by hand on its own draws (one image, so one timestep)."""
    model = vpred_model if twin == "vpred" else tiny_model
    recipe = Recipe.from_mapping(
        {**recipe.diff(), "flip_aug": False, "shuffle_caption": False, "multires_noise_iterations": 0}
    )
    prediction = model.prediction_for(recipe)
    ac = alphas_cumprod(zero_terminal_snr=prediction.ztsnr)
    latent = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(1))
    data = TrainingData(
        [CachedLatent(latent, latent.flip(-1), (64, 64), (0, 0), (64, 64))],
        ["a red square"],
        [0],
        1,
        recipe.seed,
    )
    loss = micro_batch_loss(
        model,
        data,
        0,
        recipe,
        ac,
        precision=Precision(torch.float32, None),
        prediction=prediction,
        train_te=False,
        device=CPU,
    )

    rng, gen = generators(recipe.seed, 0, CPU)
    x0 = latent[None] * model.vae.config.scaling_factor
    noise = multires_noise(tuple(x0.shape), 0, recipe.multires_noise_discount, gen, rng)
    t = torch.randint(0, len(ac), (1,), generator=gen)
    with torch.no_grad():
        context, pooled = encode_text(model, *tokenize(model, ["a red square"], CPU))
        pred = model.unet(
            add_noise(x0, noise, t, ac),
            t,
            context,
            added_cond_kwargs={
                "text_embeds": pooled,
                "time_ids": size_ids([(64, 64)], [(0, 0)], [(64, 64)], CPU),
            },
        ).sample
    a = ac[t].item()
    by_hand = a**0.5 * noise - (1 - a) ** 0.5 * x0 if v else noise
    torch.testing.assert_close(loss.detach(), F.mse_loss(pred, by_hand), rtol=1e-5, atol=1e-6)
    assert not torch.isclose(
        loss.detach(), F.mse_loss(pred, noise if v else a**0.5 * noise - (1 - a) ** 0.5 * x0)
    )


# ------------------------------------------------------------------ sampling


def test_a_ztsnr_vpred_base_samples_finite_pictures(vpred_model):
    prompt = SamplePrompt("a red square", width=64, height=64, seed=3, steps=4, cfg=5.0)
    render = Render(vpred_model, prompt, device=CPU, dtype=torch.float32, default_seed=0)
    config = render.scheduler.config
    assert (config.prediction_type, config.rescale_betas_zero_snr, config.timestep_spacing) == (
        "v_prediction",
        True,
        "trailing",
    )
    assert render.timesteps[0] == 999  # the first step starts from pure noise
    assert bool(torch.isfinite(render.scheduler.sigmas).all()) and render.guidance_rescale == 0.7
    while not render.finished:
        render.step()
        assert bool(torch.isfinite(render.latents).all())
    assert render.image().size == (64, 64)

    plain = Render(
        vpred_model, prompt, device=CPU, dtype=torch.float32, default_seed=0, prediction=Prediction()
    )
    assert (plain.scheduler.config.prediction_type, plain.guidance_rescale) == (
        "epsilon",
        0.0,
    )  # an override reaches the sampler


def test_cfg_rescale_is_diffusers_guidance_rescale():
    g = torch.Generator().manual_seed(2)
    text, guided = torch.randn(2, 4, 8, 8, generator=g), 3 * torch.randn(2, 4, 8, 8, generator=g)
    assert rescale_guidance(guided, text, 0.0) is guided
    full = rescale_guidance(guided, text, 1.0)
    torch.testing.assert_close(full.std(dim=(1, 2, 3)), text.std(dim=(1, 2, 3)))
    torch.testing.assert_close(rescale_guidance(guided, text, 0.7), 0.7 * full + 0.3 * guided)


# ------------------------------------------------------------------ metadata


def test_the_metadata_says_v(tmp_path):
    def meta(prediction: Prediction) -> dict[str, str]:
        start = metadata.training_metadata(
            Recipe(),
            captions=["a"],
            buckets=[(64, 64)],
            dataset_dir=tmp_path,
            num_batches_per_epoch=1,
            world_size=1,
            model_path="noobaiXLVpred10.safetensors",
            model_hashes=None,
            started_at=0.0,
            prediction=prediction,
        )
        return metadata.at_save(start, Recipe(), step=1, epoch=1, title="mine")

    v = meta(VPRED_ZTSNR)
    assert (v["ss_v_parameterization"], v["ss_zero_terminal_snr"], v["modelspec.prediction_type"]) == (
        "True",
        "True",
        "v",
    )
    assert v["ss_sd_model_name"] == "noobaiXLVpred10.safetensors"  # the base, as a LoRA browser shows it
    assert metadata.derived(v, "mine-resized")["modelspec.prediction_type"] == "v"  # resize and chop keep it
    eps = meta(Prediction())
    assert (eps["ss_v_parameterization"], eps["ss_zero_terminal_snr"], eps["modelspec.prediction_type"]) == (
        "False",
        "False",
        "epsilon",
    )


def test_a_lora_trained_on_a_vpred_base_says_so_and_is_read_back_so(vpred_path, vpred_model, tmp_path):
    """Through the real loop: the trained file's metadata names v and ztsnr, and what reads the
    file back (previews, the effect measure) reads the same prediction from it."""
    from loradrop.engine.data.dataset import scan
    from loradrop.engine.train.loop import train
    from loradrop.testing import TINY_RECIPE, make_dataset

    data = make_dataset(tmp_path / "data", images=1)
    recipe = Recipe.from_mapping({**TINY_RECIPE, "max_train_steps": 1, "save_every_n_steps": 0})
    final = train(
        vpred_model,
        scan(data, recipe),
        tmp_path / "out",
        recipe,
        device=CPU,
        cache_dir=tmp_path / "cache",
        emit=lambda _e: None,
    ).final
    with safe_open(str(final), "pt") as f:
        meta = f.metadata()
    assert (
        meta["ss_v_parameterization"],
        meta["ss_zero_terminal_snr"],
        meta["modelspec.prediction_type"],
    ) == ("True", "True", "v")
    assert Prediction.trained_with(meta, Prediction()) == VPRED_ZTSNR
    assert Prediction.trained_with({}, VPRED_ZTSNR) == VPRED_ZTSNR  # a file that does not say: the base's own
