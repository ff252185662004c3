"""Every name a job writes under its output folder, in one place (torch-free: clients read it too).

outputs/<job>/recipe.toml                   the resolved recipe, frozen
              sample-prompts.txt            the prompts as sampled, seeds resolved
              <name>-step00000040.safetensors  a step file
              <name>.safetensors            the final LoRA
              <name>-<resize suffix>.safetensors, <stem>-chop.safetensors
              samples/<name>_s000040_p00.png
              preview-<tag>-00.png
              blocks.json                   the block analysis and the suggested vector
              state/training-state.safetensors  the full training state (resume)
              logs/<prefix><time>/          tensorboard
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

RECIPE = "recipe.toml"
PROMPTS = "sample-prompts.txt"
ANALYSIS = "blocks.json"
STATE = "state/training-state.safetensors"
CHOP_SUFFIX = "-chop"


@dataclass(frozen=True)
class Outputs:
    root: Path
    name: str  # the LoRA's output name (file stem)

    @property
    def recipe(self) -> Path:
        return self.root / RECIPE

    @property
    def prompts(self) -> Path:
        return self.root / PROMPTS

    @property
    def analysis(self) -> Path:
        return self.root / ANALYSIS

    @property
    def state(self) -> Path:
        return self.root / STATE

    @property
    def final(self) -> Path:
        return self.root / f"{self.name}.safetensors"

    def step_file(self, step: int) -> Path:
        return self.root / f"{self.name}-step{step:08d}.safetensors"

    def sample(self, step: int, prompt_index: int) -> Path:
        return self.root / "samples" / f"{self.name}_s{step:06d}_p{prompt_index:02d}.png"

    def preview(self, tag: str, index: int) -> Path:
        return self.root / f"preview-{tag}-{index:02d}.png"

    def logs(self, prefix: str, stamp: str) -> Path:
        return self.root / "logs" / f"{prefix}{stamp}"


def chopped_name(source: Path) -> str:
    """The chopped file's name beside its source, as chop_blocks names it."""
    return f"{source.stem}{CHOP_SUFFIX}.safetensors"


def prompts_beside(lora: Path) -> Path:
    """The prompts a LoRA's job sampled, beside the LoRA in its output folder."""
    return Path(lora).parent / PROMPTS
