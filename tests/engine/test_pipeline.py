"""A whole job through the engine's Session: train, resize, analyse, chop; previews on the side."""

from __future__ import annotations

import json
import math

import pytest
import torch

from loradrop.engine import tensorfile
from loradrop.engine.events import encode
from loradrop.engine.jobspec import JobSpec
from loradrop.engine.session import Session
from loradrop.testing import BUCKET_SIZES, TINY_RECIPE, make_dataset


def _spec(tmp_path, data, job_id, **extra):
    return JobSpec(
        job_id=job_id,
        name="demo",
        dataset=data,
        out_dir=tmp_path / job_id,
        recipe={**TINY_RECIPE, "max_train_steps": 2, "sample_every_n_steps": 0},
        cache_dir=tmp_path / "cache",
        **extra,
    )


@pytest.fixture(scope="module")
def session():
    return Session(device="cpu")


def test_a_job_trains_resizes_analyses_and_chops(session, tmp_path):
    data = make_dataset(tmp_path / "data", images=3, sizes=BUCKET_SIZES)
    events = []
    vector = "1,0,0,0,0,0,0,0,0,0,0,0,0,1,0,0,0,0,0,0,0"  # the guide's example: OUT01 only
    result = session.run(
        _spec(tmp_path, data, "job1", block_vector=vector), lambda e: events.append(encode(e))
    )
    stages = [p["stage"] for k, p in events if k == "stage"]
    assert stages == ["scan", "cache", "train", "resize", "analyze", "chop", "done"]
    kinds = [p["kind"] for k, p in events if k == "artifact"]
    assert kinds == ["recipe", "step", "final", "resized", "analysis", "chopped"]
    assert result.resized.name == "demo_frockpt1_th-3.55.safetensors"
    assert result.chopped.name == "demo_frockpt1_th-3.55-chop.safetensors"
    with tensorfile.TensorFile(result.chopped) as tf:
        unet = {k for k in tf.keys() if k.startswith("lora_unet_")}
        assert unet and all(k.startswith("lora_unet_output_blocks_1_") for k in unet)
        assert tf.metadata["block_vector_string"] == vector
    analysis = json.loads((tmp_path / "job1" / "blocks.json").read_text())
    assert len(analysis["blocks"]) == 20 and abs(sum(b["share"] for b in analysis["blocks"]) - 1) < 1e-6


def test_the_model_stays_loaded_between_jobs(session, tmp_path):
    data = make_dataset(tmp_path / "data", images=2, sizes=BUCKET_SIZES)
    session.run(_spec(tmp_path, data, "a"), lambda *a: None)
    first = session.model(None)
    session.run(_spec(tmp_path, data, "b"), lambda *a: None)
    assert session.model(None) is first


class PreviewEachStep:
    """A control that asks for a preview between every two steps, as the daemon's worker may."""

    def __init__(self, session, lora, out_dir):
        self.session, self.lora, self.out_dir, self.paths = session, lora, out_dir, []

    def poll(self, lend=None):
        render = self.session.start_preview(
            self.lora,
            "1," + ",".join(["0"] * 12 + ["1"] * 8),
            ["a circle --w 64 --h 64 --s 2"],
            3,
            None,
            self.out_dir,
        )
        render.advance(
            math.inf, lambda: None, lend
        )  # the job's adapters, lent by the loop, set aside meanwhile
        self.paths += render.paths
        return set()

    def check(self):
        pass


class PreviewInSlices(PreviewEachStep):
    """One preview spread over the steps of a job, one denoising step per step boundary, as the
    daemon's worker renders it while a job trains (a bounded share of each step's time)."""

    def __init__(self, session, lora, out_dir):
        super().__init__(session, lora, out_dir)
        self.render, self.slices = None, 0

    def poll(self, lend=None):
        if self.render is None:
            self.render = self.session.start_preview(
                self.lora, None, ["a circle --w 64 --h 64 --s 2"], 3, None, self.out_dir, steps=2
            )
        if not self.render.finished:
            self.render.advance(0.0, lambda: None, lend)
            self.slices += 1
        return set()


def test_previews_between_steps_leave_training_unchanged(session, tmp_path):
    data = make_dataset(tmp_path / "data", images=2, sizes=BUCKET_SIZES)
    plain = session.run(_spec(tmp_path, data, "plain"), lambda *a: None)
    control = PreviewEachStep(session, plain.final, tmp_path / "previews")
    busy = session.run(_spec(tmp_path, data, "busy"), lambda *a: None, control)
    assert len(control.paths) == 2 and all(p.exists() for p in control.paths)
    with tensorfile.TensorFile(plain.final) as a, tensorfile.TensorFile(busy.final) as b:
        ta, tb = a.read_all(), b.read_all()
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    # a preview between jobs renders the same picture as one during a job
    again = session.preview(
        plain.final,
        "1," + ",".join(["0"] * 12 + ["1"] * 8),
        ["a circle --w 64 --h 64 --s 2"],
        3,
        None,
        tmp_path / "again",
    )
    assert again[0].read_bytes() == control.paths[0].read_bytes()


def test_a_preview_in_slices_between_steps_is_the_same_picture_and_leaves_training_unchanged(
    session, tmp_path
):
    data = make_dataset(tmp_path / "data", images=2, sizes=BUCKET_SIZES)
    plain = session.run(_spec(tmp_path, data, "plain"), lambda *a: None)
    control = PreviewInSlices(session, plain.final, tmp_path / "sliced")
    busy = session.run(_spec(tmp_path, data, "busy"), lambda *a: None, control)
    assert (
        control.slices == 2 and control.render.finished
    )  # the job's two steps, one denoising step after each
    with tensorfile.TensorFile(plain.final) as a, tensorfile.TensorFile(busy.final) as b:
        ta, tb = a.read_all(), b.read_all()
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    (sliced,) = control.render.paths
    (whole,) = session.preview(
        plain.final, None, ["a circle --w 64 --h 64 --s 2"], 3, None, tmp_path / "whole", steps=2
    )
    assert sliced.read_bytes() == whole.read_bytes()


def test_a_written_lora_with_inf_or_nan_is_refused_and_never_listed(tmp_path):
    """finite_output: a resize or chop whose result is not finite leaves no file in the folder."""
    from safetensors.torch import save_file

    from loradrop.engine.lora.finite import finite_output
    from loradrop.errors import UserError

    def write(bad: float):
        def into(staging):
            path = staging / "x-chop.safetensors"
            save_file(
                {"m.lora_up.weight": torch.tensor([[1.0, bad]]), "m.alpha": torch.tensor(1.0)}, str(path)
            )
            return path

        return into

    for bad in (float("inf"), float("nan")):
        with pytest.raises(UserError, match="would hold inf or NaN .in m.lora_up.weight.; it was not kept"):
            finite_output(write(bad), tmp_path)
        assert list(tmp_path.iterdir()) == []  # nothing listed, the staging folder gone too
    assert finite_output(write(2.0), tmp_path) == tmp_path / "x-chop.safetensors"
    assert [p.name for p in tmp_path.iterdir()] == ["x-chop.safetensors"]


def test_the_analysis_suggests_blocks_by_their_effect_on_the_sample_prompts(session, tmp_path):
    data = make_dataset(
        tmp_path / "data", images=2, sizes=BUCKET_SIZES, prompts=["a circle --w 64 --h 64 --s 4 --d 1"]
    )
    spec = _spec(tmp_path, data, "job-effect")
    spec.recipe = {**spec.recipe, "suggest_by": "effect", "resize_recipe": ""}
    events = []
    session.run(spec, lambda e: events.append(encode(e)))
    analysis = json.loads((tmp_path / "job-effect" / "blocks.json").read_text())
    assert analysis["suggested_by"] == "effect" and len(analysis["effect_shares"]) == 20
    assert abs(sum(analysis["effect_shares"]) - 1) < 1e-6
    vector = [float(v) for v in analysis["suggested_vector_90"].split(",")]
    kept = sum(s for s, v in zip(analysis["effect_shares"], vector[1:]) if v)
    assert vector[0] == 1 and kept >= 0.9 - 1e-9
    measured = [p for k, p in events if k == "progress" and p["stage"] == "analyze"]
    assert (
        measured and measured[-1]["done"] == measured[-1]["total"] == 22
    )  # every block off, then all on and all off
    assert any("most effect on the sample prompts" in p["text"] for k, p in events if k == "log")
