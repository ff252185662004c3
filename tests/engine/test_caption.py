"""Captioning a folder with a tiny WD14-layout tagger (onnxruntime) and tiny random VLMs
(transformers), all built here, loaded through the code path a real model takes."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from loradrop.engine.caption import (
    Existing,
    Outcome,
    TaggerSpec,
    VlmSpec,
    caption_folder,
    load_captioner,
    with_trigger,
)
from loradrop.engine.caption.tiny import TINY_TAGS, make_tiny_tagger, make_tiny_vlm, write_tags_csv
from loradrop.engine.caption.wd14 import caption_name, preprocess
from loradrop.errors import UserError

BLUE = "1girl, solo, ^_^, blue theme, hatsune miku, kagamine rin"  # a blue square, fed BGR
RED_TALL = "1girl, solo, ^_^, white background, hatsune miku, kagamine rin"  # padded half white


@pytest.fixture(scope="module")
def tagger(tmp_path_factory):
    return make_tiny_tagger(tmp_path_factory.mktemp("tagger"))


@pytest.fixture(scope="module", params=["llava", "blip"])
def vlm(request, tmp_path_factory):
    return make_tiny_vlm(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture
def dataset(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    Image.new("RGB", (40, 40), (0, 0, 255)).save(folder / "a.png")
    Image.new("RGB", (20, 40), (255, 0, 0)).save(folder / "b.png")
    return folder


def captions(folder):
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.txt"))}


def sentence(text: str) -> bool:
    return "\n" not in text and text.endswith(".") and "Traceback" not in text


def test_tags_above_the_thresholds_in_kohyas_order(tagger, dataset):
    result = caption_folder(dataset, TaggerSpec(tagger))
    assert captions(dataset) == {"a.txt": BLUE + "\n", "b.txt": RED_TALL + "\n"}
    assert [r.outcome for r in result.images] == [Outcome.WRITTEN, Outcome.WRITTEN]
    assert [r.caption for r in result.images] == [BLUE, RED_TALL]
    # long_hair (0.343) is just under 0.35; the ratings are left out.
    assert "long hair" not in BLUE and "sensitive" not in BLUE


def test_the_model_sees_bgr_pixels_0_to_255(tagger):
    tagger_ = load_captioner(TaggerSpec(tagger))
    probs = tagger_.probabilities([Image.new("RGB", (32, 32), (0, 0, 255))])[0]
    bgr_means = np.array([1.0, 0.0, 0.0])
    expected = [1 / (1 + math.exp(-(t.bias + float(np.dot(t.weights, bgr_means))))) for t in TINY_TAGS]
    np.testing.assert_allclose(probs, expected, rtol=1e-5)


def test_rgb_taggers_get_rgb(tagger, dataset):
    caption_folder(dataset, TaggerSpec(tagger, bgr=False))
    assert "blue theme" not in captions(dataset)["a.txt"]


def test_pads_to_a_white_square_centred():
    pixels = preprocess(Image.new("RGB", (2, 4), (255, 0, 0)), 4, bgr=True)
    assert pixels.shape == (4, 4, 3) and pixels.dtype == np.float32
    assert (pixels[:, [0, 3]] == 255).all()  # one white column each side
    assert (pixels[:, 1:3] == [0, 0, 255]).all()  # red, in BGR


@pytest.mark.parametrize(
    ("raw", "name"),
    [
        ("long_hair", "long hair"),
        ("^_^", "^_^"),
        ("o_o", "o_o"),
        ("=_=", "=_="),
        ("one_(series)", "one (series)"),
    ],
)
def test_underscores_become_spaces_except_in_kaomoji(raw, name):
    assert caption_name(raw) == name


def test_character_threshold_exclusions_rating_and_trigger(tagger, dataset):
    spec = TaggerSpec(
        tagger, character_threshold=0.85, exclude_tags=("solo", "white_background"), keep_rating=True
    )
    caption_folder(dataset, spec, trigger="mychar")
    assert captions(dataset)["b.txt"] == "mychar, sensitive, 1girl, ^_^, kagamine rin\n"


def test_trigger_goes_first_once():
    assert with_trigger("a, mychar, b", "mychar") == "mychar, a, b"
    assert with_trigger("a cat on a mat", "mychar") == "mychar, a cat on a mat"
    assert with_trigger("a", None) == "a" and with_trigger("", "mychar") == "mychar"


@pytest.mark.parametrize("batch", [1, 2])
def test_a_fixed_batch_model_takes_whole_batches(tmp_path, dataset, batch):
    Image.new("RGB", (40, 40), (0, 0, 255)).save(dataset / "c.png")
    model = make_tiny_tagger(tmp_path / "fixed", batch=batch)
    caption_folder(dataset, TaggerSpec(model, batch_size=4))
    assert captions(dataset) == {"a.txt": BLUE + "\n", "b.txt": RED_TALL + "\n", "c.txt": BLUE + "\n"}


def test_existing_captions_refused_kept_or_overwritten(tagger, dataset):
    (dataset / "a.txt").write_text("old\n")
    with pytest.raises(
        UserError, match="1 of 2 images .* already have captions \\(a.txt\\); pass --overwrite"
    ) as e:
        caption_folder(dataset, TaggerSpec(dataset / "no-such-model"))  # refused before the model loads
    assert sentence(str(e.value))
    result = caption_folder(dataset, TaggerSpec(tagger), existing=Existing.KEEP)
    assert captions(dataset) == {"a.txt": "old\n", "b.txt": RED_TALL + "\n"}
    assert [r.outcome for r in result.images] == [Outcome.KEPT, Outcome.WRITTEN]
    caption_folder(dataset, TaggerSpec(tagger), existing=Existing.OVERWRITE)
    assert captions(dataset)["a.txt"] == BLUE + "\n"


def test_dry_run_writes_nothing(tagger, dataset):
    result = caption_folder(dataset, TaggerSpec(tagger), dry_run=True)
    assert captions(dataset) == {}
    assert [(r.caption_file.name, r.outcome, r.caption) for r in result.images] == [
        ("a.txt", Outcome.WOULD_WRITE, BLUE),
        ("b.txt", Outcome.WOULD_WRITE, RED_TALL),
    ]


def test_unreadable_images_fail_alone(tagger, dataset):
    (dataset / "c.png").write_bytes(b"not a png")
    (dataset / "d.jpg").write_bytes(b"")
    seen = []
    result = caption_folder(
        dataset, TaggerSpec(tagger, batch_size=3), progress=lambda done, total: seen.append((done, total))
    )
    assert captions(dataset) == {"a.txt": BLUE + "\n", "b.txt": RED_TALL + "\n"}
    failed = {r.image.name: r.reason for r in result.failed}
    assert set(failed) == {"c.png", "d.jpg"}
    assert failed["d.jpg"] == "d.jpg cannot be read (empty file); replace or remove it."
    assert all(sentence(reason) and name in reason for name, reason in failed.items())
    assert seen == [(0, 4), (3, 4), (4, 4)]
    assert "2 written, 2 failed" in result.summary()


def test_images_sharing_a_caption_file_are_not_captioned(tagger, dataset):
    Image.new("RGB", (40, 40), (0, 0, 255)).save(dataset / "a.jpg")
    result = caption_folder(dataset, TaggerSpec(tagger))
    assert captions(dataset) == {"b.txt": RED_TALL + "\n"}
    assert [(r.image.name, r.reason) for r in result.failed] == [
        ("a.jpg", "a.jpg and a.png share the caption file a.txt; rename all but one."),
        ("a.png", "a.jpg and a.png share the caption file a.txt; rename all but one."),
    ]


class _RefusesTallImages:
    """The real tagger behind a model that raises on some inputs, as a VLM's processor does for
    an aspect ratio it refuses; no tiny model here fails on a readable image by itself."""

    def __init__(self, inner):
        self.inner, self.batch_size, self.description, self.empty_hint = (
            inner,
            4,
            inner.description,
            inner.empty_hint,
        )

    def caption(self, images):
        if any(im.height > im.width for im in images):
            raise ValueError("absolute aspect ratio must be smaller than 1\nmore detail")
        return self.inner.caption(images)


def test_an_image_the_captioner_fails_on_fails_alone(tagger, dataset):
    result = caption_folder(dataset, _RefusesTallImages(load_captioner(TaggerSpec(tagger))))
    assert captions(dataset) == {"a.txt": BLUE + "\n"}
    assert [r.reason for r in result.failed] == [
        "b.png could not be captioned (absolute aspect ratio must be smaller than 1)."
    ]


def test_no_tag_above_the_threshold_is_a_failure(tagger, dataset):
    result = caption_folder(dataset, TaggerSpec(tagger, threshold=0.99))
    assert captions(dataset) == {}
    assert [r.reason for r in result.failed] == [
        f"{n} got an empty caption: no tag reached the threshold; lower --threshold."
        for n in ("a.png", "b.png")
    ]


def test_tags_csv_not_matching_the_model(tmp_path, dataset):
    model = make_tiny_tagger(tmp_path / "t")
    write_tags_csv(model / "selected_tags.csv", TINY_TAGS[:-1])
    with pytest.raises(UserError) as e:
        caption_folder(dataset, TaggerSpec(model))
    assert str(e.value) == (
        f"{model / 'selected_tags.csv'} lists 11 tags but {model / 'model.onnx'} outputs 12 scores per image; use the selected_tags.csv that came with this model."
    )
    assert captions(dataset) == {}


def _empty(path):
    path.mkdir()


def _junk_onnx(path):
    make_tiny_tagger(path)
    (path / "model.onnx").write_bytes(b"\x00junk" * 10)


def _no_csv(path):
    make_tiny_tagger(path)
    (path / "selected_tags.csv").unlink()


def _bad_header(path):
    make_tiny_tagger(path)
    (path / "selected_tags.csv").write_text("id,tag\n1,solo\n")


def _junk_config(path):
    path.mkdir()
    (path / "config.json").write_text("{not json")


@pytest.mark.parametrize(
    ("make", "spec", "message"),
    [
        (_empty, TaggerSpec, "holds neither model.onnx nor config.json"),
        (_junk_onnx, TaggerSpec, "model.onnx cannot be loaded by onnxruntime"),
        (_no_csv, TaggerSpec, "has model.onnx but no selected_tags.csv"),
        (_bad_header, TaggerSpec, "is not a WD14 tags list: its header is id,tag"),
        (_junk_config, VlmSpec, "has no processor transformers can load"),
    ],
)
def test_unreadable_model_folders(tmp_path, dataset, make, spec, message):
    from loradrop.engine.caption import detect_kind

    model = tmp_path / "model"
    make(model)
    with pytest.raises(UserError, match=message) as e:
        caption_folder(dataset, detect_kind(model)(model) if make is _empty else spec(model))
    assert sentence(str(e.value)) and str(model) in str(e.value)


def test_vlm_captions_are_written(vlm, dataset):
    (dataset / "c.png").write_bytes(b"not a png")
    result = caption_folder(dataset, VlmSpec(vlm, max_length=6, batch_size=2), trigger="mychar")
    written = result.with_outcome(Outcome.WRITTEN)
    assert [r.image.name for r in written] == ["a.png", "b.png"]
    assert [r.image.name for r in result.failed] == ["c.png"]
    for r in written:
        assert r.caption.startswith("mychar, ") and len(r.caption) > len("mychar, ")
        assert r.caption_file.read_text(encoding="utf-8") == r.caption + "\n"
    # the same captions one image at a time: batching (and its padding) changes nothing
    again = caption_folder(
        dataset, VlmSpec(vlm, max_length=6, batch_size=1), trigger="mychar", existing=Existing.OVERWRITE
    )
    assert [r.caption for r in again.with_outcome(Outcome.WRITTEN)] == [r.caption for r in written]


def test_cuda_asked_for_without_its_provider(tagger, dataset):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    with pytest.raises(UserError, match="^onnxruntime here has no CUDA provider; install onnxruntime-gpu"):
        caption_folder(dataset, TaggerSpec(tagger, device="cuda"))
