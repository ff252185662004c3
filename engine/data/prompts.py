"""Sample prompts: kohya's prompt-file format (train_util.line_to_prompt_dict), or, for a dataset
without one, a few of its own captions.

A line is `prompt --w 832 --h 1216 --d 42 --s 30 --l 7 --n negative prompt --ss euler_a`: the
options are split off on " --". Width and height default to 512 and are floored to a multiple of
8 (at least 64), steps default to 30 (at least 1), CFG to 7.5. An option loradrop does not
know, or a value that does not parse, is reported and ignored, never fatal.

A prompt past the limits (`MAX_SAMPLE_PIXELS`, `MAX_SAMPLE_STEPS`) is refused, in a prompt file
and in a preview request alike: a sample renders in the training worker between two steps, and
one of 100,000² pixels or 1,000 steps would hold the job (and its GPU) for hours.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from loradrop.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_SIZE = 512
DEFAULT_STEPS = 30
DEFAULT_CFG = 7.5
MAX_SAMPLE_PIXELS = 2048 * 2048  # 4 megapixels: twice SDXL's trained area on each side
MAX_SAMPLE_STEPS = 150


@dataclass(frozen=True)
class SamplePrompt:
    prompt: str
    negative: str = ""
    width: int = DEFAULT_SIZE
    height: int = DEFAULT_SIZE
    seed: int | None = None  # None: the sampler chooses
    steps: int = DEFAULT_STEPS
    cfg: float = DEFAULT_CFG
    sampler: str | None = None  # None: the recipe's sample_sampler

    def line(self) -> str:
        """The prompt back in the file's syntax, every option spelled out."""
        parts = [
            self.prompt,
            f"--w {self.width}",
            f"--h {self.height}",
            f"--s {self.steps}",
            f"--l {self.cfg:g}",
        ]
        if self.seed is not None:
            parts.append(f"--d {self.seed}")
        if self.negative:
            parts.append(f"--n {self.negative}")
        if self.sampler:
            parts.append(f"--ss {self.sampler}")
        return " ".join(parts)


MAX_PROMPT_FILE_BYTES = 1 << 20


def parse_prompt_file(
    path: str | os.PathLike, warn: Callable[[str], None] | None = None
) -> list[SamplePrompt]:
    """Every prompt in the file; `warn` (default: this module's logger) hears about ignored options."""
    path = Path(path)
    warn = warn or log.warning
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PROMPT_FILE_BYTES + 1)  # a sparse file of gigabytes is never read whole
        if len(data) > MAX_PROMPT_FILE_BYTES:
            raise UserError(
                f"{path} is larger than {MAX_PROMPT_FILE_BYTES >> 20} MB; a sample prompt file holds a few lines, one prompt each."
            )
        text = data.decode("utf-8-sig")
    except OSError as e:
        raise UserError(
            f"{path} cannot be read ({e.strerror or e}); expected a sample prompt file."
        ) from None
    except UnicodeDecodeError as e:
        raise UserError(
            f"{path} is not UTF-8 text (bad byte at offset {e.start}); save the prompt file as UTF-8."
        ) from None
    prompts = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            prompt = parse_prompt_line(line, lambda msg: warn(f"{path}, line {number}: {msg}"))
            check_limits(prompt, f"{path}, line {number}")
            prompts.append(prompt)
    return prompts


def check_limits(prompt: SamplePrompt, where: str) -> None:
    """Refuse a prompt that would render for hours (or exhaust the memory) in one sentence."""
    if prompt.width * prompt.height > MAX_SAMPLE_PIXELS:
        raise UserError(
            f"{where}: a sample of {prompt.width}x{prompt.height} is too large; ask for at most "
            f"{MAX_SAMPLE_PIXELS >> 20} megapixels (e.g. --w 2048 --h 2048)."
        )
    if prompt.steps > MAX_SAMPLE_STEPS:
        raise UserError(
            f"{where}: --s {prompt.steps} is too many sampling steps; ask for at most {MAX_SAMPLE_STEPS}."
        )


def parse_prompt_line(line: str, warn: Callable[[str], None]) -> SamplePrompt:
    prompt, *options = line.split(" --")
    values: dict = {}
    for option in options:
        name, _, value = option.strip().partition(" ")
        name, value = name.lower(), value.strip()
        if name not in _OPTIONS:
            warn(f"unknown option --{option.strip()}, ignored")
            continue
        field, convert = _OPTIONS[name]
        try:
            values[field] = convert(value)
        except ValueError:
            warn(f"--{name} {value!r} is not a valid value, ignored")
    return SamplePrompt(prompt=prompt.strip(), **values)


def _size(value: str) -> int:
    return max(64, int(value) // 8 * 8)


def _seed(value: str) -> int:
    seed = int(value)
    if not -(2**63) <= seed < 2**64:  # what a torch generator takes
        raise ValueError("out of range")
    return seed


def _text(value: str) -> str:
    if not value:
        raise ValueError("empty")
    return value


_OPTIONS: dict[str, tuple[str, Callable[[str], object]]] = {
    "w": ("width", _size),
    "h": ("height", _size),
    "d": ("seed", _seed),
    "s": ("steps", lambda v: max(1, int(v))),
    "l": ("cfg", float),
    "n": ("negative", str),
    "ss": ("sampler", _text),
}


def prompts_from_captions(items: Sequence, n: int = 4) -> list[SamplePrompt]:
    """Up to `n` distinct captions of the dataset, evenly spread over it, each at its image's bucket
    size: what the LoRA learned, at the size it learned it. Deterministic (items come sorted)."""
    seen: dict[str, tuple[int, int]] = {}
    for item in items:
        if item.caption and item.caption not in seen:
            seen[item.caption] = item.bucket
    captions = list(seen.items())
    count = min(n, len(captions))
    chosen = [captions[i * len(captions) // count] for i in range(count)]
    return [SamplePrompt(prompt=caption, width=w, height=h) for caption, (w, h) in chosen]
