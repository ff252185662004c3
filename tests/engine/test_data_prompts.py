"""Sample prompts: kohya's prompt-file format, and prompts taken from the dataset's captions."""

from __future__ import annotations

import logging

import pytest

from loradrop.engine.data.dataset import Item
from loradrop.engine.data.prompts import SamplePrompt, parse_prompt_file, prompts_from_captions
from loradrop.errors import UserError

PROMPTS = """\
# the seed's prompts
masterpiece, 1girl, red hair --n lowres, bad anatomy --w 832 --h 1216 --d 42 --s 28 --l 6.5 --ss euler_a

   a plain prompt with defaults
  # an indented comment
odd sizes --w 1001 --h 20 --s 150
UPPER CASE OPTIONS --W 640 --H 768 --D 7 --L 5
"""


def test_parse_prompt_file(tmp_path):
    path = tmp_path / "sample-prompts.txt"
    path.write_text(PROMPTS, encoding="utf-8")
    warnings = []
    prompts = parse_prompt_file(path, warnings.append)
    assert warnings == []
    assert prompts == [
        SamplePrompt(
            prompt="masterpiece, 1girl, red hair",
            negative="lowres, bad anatomy",
            width=832,
            height=1216,
            seed=42,
            steps=28,
            cfg=6.5,
            sampler="euler_a",
        ),
        SamplePrompt(
            prompt="a plain prompt with defaults",
            negative="",
            width=512,
            height=512,
            seed=None,
            steps=30,
            cfg=7.5,
            sampler=None,
        ),
        SamplePrompt(prompt="odd sizes", width=1000, height=64, steps=150),  # floored to 8, at least 64
        SamplePrompt(prompt="UPPER CASE OPTIONS", width=640, height=768, seed=7, cfg=5.0),
    ]


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ("huge --w 4096 --h 4096 --s 20", "a sample of 4096x4096 is too large; ask for at most 4 megapixels"),
        ("wide --w 100000 --h 64", "a sample of 100000x64 is too large"),
        ("long --s 1000", "--s 1000 is too many sampling steps; ask for at most 150"),
    ],
)
def test_samples_past_the_limits_are_refused_naming_the_line(tmp_path, line, words):
    """A training sample renders between two steps of its job: one of 4096² at 1,000 steps held
    the job for minutes and would not cancel; the same limits as previews hold."""
    path = tmp_path / "sample-prompts.txt"
    path.write_text(f"fine --w 1024 --h 1024 --s 30\n{line}\n")
    with pytest.raises(UserError) as e:
        parse_prompt_file(path)
    assert str(e.value).startswith(f"{path}, line 2: ") and words in str(e.value), str(e.value)


def test_unknown_options_and_bad_values_are_warned_not_fatal(tmp_path, caplog):
    path = tmp_path / "p.txt"
    path.write_text("\ufeffa cat --x 3 --w wide --cn control.png --s 0\n", encoding="utf-8")
    warnings = []
    (prompt,) = parse_prompt_file(path, warnings.append)
    assert prompt == SamplePrompt(prompt="a cat", steps=1)
    assert len(warnings) == 3
    assert all(w.startswith(f"{path}, line 1: ") for w in warnings)
    assert "unknown option --x 3" in warnings[0]
    assert "--w 'wide'" in warnings[1]
    assert "unknown option --cn control.png" in warnings[2]
    with caplog.at_level(logging.WARNING, logger="loradrop.engine.data.prompts"):
        parse_prompt_file(path)
    assert len(caplog.records) == 3  # the default reporter is the module's logger


def test_prompt_file_errors(tmp_path):
    with pytest.raises(UserError, match="cannot be read"):
        parse_prompt_file(tmp_path / "missing.txt")
    path = tmp_path / "latin.txt"
    path.write_bytes("caf\u00e9 --w 512".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8"):
        parse_prompt_file(path)


def test_only_comments_gives_no_prompts(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# nothing\n\n   \n")
    assert parse_prompt_file(path) == []


def items(captions: list[str]) -> list[Item]:
    buckets = [(1024, 1024), (832, 1216), (1216, 832)]
    return [
        Item(path=f"{i}.png", caption=c, size=(1, 1), bucket=buckets[i % 3]) for i, c in enumerate(captions)
    ]


def test_prompts_from_captions():
    data = items([f"caption {i}" for i in range(10)])
    prompts = prompts_from_captions(data, n=4)
    assert [p.prompt for p in prompts] == ["caption 0", "caption 2", "caption 5", "caption 7"]
    assert prompts == prompts_from_captions(data, n=4)
    assert [(p.width, p.height) for p in prompts] == [(1024, 1024), (1216, 832), (1216, 832), (832, 1216)]
    assert all(p.seed is None and p.steps == 30 and p.cfg == 7.5 and p.negative == "" for p in prompts)


def test_prompts_from_few_or_repeated_captions():
    data = items(["same", "", "same", "other"])
    assert [p.prompt for p in prompts_from_captions(data, n=4)] == ["same", "other"]
    assert prompts_from_captions(items(["", ""]), n=4) == []
    assert [p.prompt for p in prompts_from_captions(data, n=1)] == ["same"]


def test_a_sparse_prompt_file_of_gigabytes_is_refused_without_reading_it(tmp_path):
    huge = tmp_path / "sample-prompts.txt"
    with open(huge, "wb") as f:
        f.truncate(64 << 30)  # sparse: nothing on disk, 64 GB to a reader
    with pytest.raises(UserError, match="larger than 1 MB"):
        parse_prompt_file(huge)
