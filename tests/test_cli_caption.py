"""`loradrop caption` as a user runs it, on tiny models built here."""

from __future__ import annotations

import pytest
from PIL import Image

from loradrop.cli import main
from loradrop.engine.caption.tiny import make_tiny_tagger, make_tiny_vlm

BLUE = "1girl, solo, ^_^, blue theme, hatsune miku, kagamine rin"
RED_TALL = "1girl, solo, ^_^, white background, hatsune miku, kagamine rin"


@pytest.fixture(scope="module")
def tagger(tmp_path_factory):
    return make_tiny_tagger(tmp_path_factory.mktemp("tagger"))


@pytest.fixture
def dataset(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    Image.new("RGB", (40, 40), (0, 0, 255)).save(folder / "a.png")
    Image.new("RGB", (20, 40), (255, 0, 0)).save(folder / "b.png")
    return folder


def run(capsys, *argv):
    code = main(["caption", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def captions(folder):
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.txt"))}


def test_dry_run_prints_what_it_would_write(capsys, tagger, dataset):
    code, out, err = run(capsys, dataset, "--model", tagger, "--dry-run")
    assert code == 0 and captions(dataset) == {}
    lines = out.splitlines()
    assert lines[:2] == [f"{dataset / 'a.txt'}: {BLUE}", f"{dataset / 'b.txt'}: {RED_TALL}"]
    assert lines[2].startswith(f"{dataset}: 2 would write (WD14 tagger {tagger} (CPU), ")
    assert "caption 2/2 [" in err  # the progress bar


def test_writes_captions_with_trigger_and_options(capsys, tagger, dataset):
    code, out, _ = run(
        capsys,
        dataset,
        "--model",
        tagger / "model.onnx",
        "--trigger",
        "mychar",
        "--exclude-tags",
        "solo, white_background",
        "--character-threshold",
        "0.85",
    )
    assert code == 0 and "2 written" in out
    assert captions(dataset) == {
        "a.txt": "mychar, 1girl, ^_^, blue theme, kagamine rin\n",
        "b.txt": "mychar, 1girl, ^_^, kagamine rin\n",
    }


def test_existing_captions_need_a_choice(capsys, tagger, dataset):
    (dataset / "a.txt").write_text("old\n")
    code, out, err = run(capsys, dataset, "--model", tagger)
    assert code == 2 and out == ""
    assert (
        err
        == f"loradrop: 1 of 2 images in {dataset} already have captions (a.txt); pass --overwrite to replace them or --missing-only to caption only the others.\n"
    )
    code, out, _ = run(capsys, dataset, "--model", tagger, "--missing-only")
    assert code == 0 and "1 written, 1 kept" in out
    assert captions(dataset) == {"a.txt": "old\n", "b.txt": RED_TALL + "\n"}
    assert run(capsys, dataset, "--model", tagger, "--overwrite")[0] == 0
    assert captions(dataset)["a.txt"] == BLUE + "\n"


def test_an_unreadable_image_is_named_and_the_others_captioned(capsys, tagger, dataset):
    (dataset / "c.png").write_bytes(b"not a png")
    code, out, err = run(capsys, dataset, "--model", tagger)
    assert code == 1
    assert "failed: c.png cannot be read (not a PNG, JPEG or WebP image); replace or remove it.\n" in err
    assert "2 written, 1 failed" in out
    assert set(captions(dataset)) == {"a.txt", "b.txt"}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--model", "{tmp}/nothing"],
            "Caption model {tmp}/nothing does not exist; give --model a WD14 tagger folder",
        ),
        (
            ["--model", "{tagger}", "--prompt", "hi"],
            "--prompt do not apply to {tagger}, which is a tagger; leave them out (or pass --kind).",
        ),
        (
            ["--model", "{tagger}", "--threshold", "35"],
            "--threshold and --character-threshold are probabilities; give values from 0 to 1, not [35.0].",
        ),
        (
            ["--model", "{tagger}", "--kind", "vlm", "--threshold", "0.5"],
            "--threshold do not apply to {tagger}, which is a vision-language model",
        ),
        (
            ["--model", "{tagger}", "--batch-size", "0"],
            "--batch-size 0 is not a number of images; give 1 or more.",
        ),
    ],
)
def test_bad_input_is_one_sentence(capsys, tmp_path, tagger, dataset, argv, message):
    code, out, err = run(capsys, dataset, *(a.format(tmp=tmp_path, tagger=tagger) for a in argv))
    assert code == 2 and out == ""
    assert err.startswith("loradrop: " + message.format(tmp=tmp_path, tagger=tagger)) and err.count("\n") == 1


def test_a_vision_language_model(capsys, tmp_path, dataset):
    model = make_tiny_vlm(tmp_path / "llava", "llava")
    code, out, err = run(
        capsys,
        dataset,
        "--model",
        model,
        "--prompt",
        "write a caption for this image",
        "--max-length",
        "5",
        "--trigger",
        "mychar",
    )
    assert code == 0, err
    assert "2 written (LlavaForConditionalGeneration" in out
    written = captions(dataset)
    assert set(written) == {"a.txt", "b.txt"}
    assert all(
        text.startswith("mychar, ") and text.endswith("\n") and text.count("\n") == 1
        for text in written.values()
    )
    assert "Loading weights" not in err  # transformers' own bars are kept quiet
