"""The concept a LoRA learns in the known-answer checks: a colour the learned twin never saw,
bound to a trigger word.

The base twin draws red, yellow, green and blue shapes; "a zkq circle on a white background"
means nothing to it. A dataset of cyan shapes captioned with "zkq" teaches a LoRA that word.

Why cyan, not magenta: for a word it does not know, the twin blends the colours it does, and
its red-and-blue blend is magenta: it drew "a zkq circle" magenta in 12 of 32 seeded samples
with no LoRA at all. It drew it cyan in none (and "" cyan 8 times in 32: the empty prompt is
not a concept prompt).
Torch-free: the demo and the daemon tests write the dataset without loading the engine.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path

import tomli_w

from . import world

# The seed recipe's algorithm and optimizer, scaled to a CPU and the twin's 64 px world.
LIGHT_RECIPE = {
    "resolution": 64,
    "min_bucket_reso": 32,
    "max_bucket_reso": 128,
    # Tuned on the committed twin (docs/twin.md): at batch 8 the concept reached 47% of samples
    # (lr 1e-3) and higher rates did worse (ClybW's first updates are ~20x lr); batch 16 reaches
    # 88%, as does 24, at 1e-3 for the UNet and both text encoders alike.
    "train_batch_size": 16,
    "gradient_accumulation_steps": 1,
    "max_train_steps": 80,
    "learning_rate": 1e-3,
    "unet_lr": 1e-3,
    "text_encoder_lr": 1e-3,
    "save_every_n_steps": 10,
    "sample_every_n_steps": 10,
    "flip_aug": False,
    # fp32 on a CPU: a LoRA trained against bf16-rounded weights of so small a model learns to
    # undo the rounding, and then hurts the fp32 model it is applied to (and bf16 is slower here).
    "mixed_precision": "no",
}


@dataclass(frozen=True)
class Concept:
    trigger: str = "zkq"
    colour: str = "cyan"

    def caption(self, shape: str, background: str) -> str:
        return world.caption(self.trigger, shape, background)

    def scenes(self, count: int, seed: int) -> list[world.Scene]:
        return [replace(s, colour=self.colour) for s in world.scenes(count, seed)]

    def prompts(self, count: int, seed: int) -> list[str]:
        """Trigger-word prompts over every shape and background, in a seeded order."""
        rng = random.Random(seed)
        return [
            self.caption(rng.choice(world.SHAPES), rng.choice(sorted(world.BACKGROUNDS)))
            for _ in range(count)
        ]


CONCEPT = Concept()


def write_concept_dataset(
    folder: str | Path,
    *,
    images: int = 24,
    anchors: int = 24,
    seed: int = 11,
    name: str = "zkq-shapes",
    block_vector: str | None = None,
    recipe: dict | None = None,
) -> Path:
    """A dataset folder as a user drops it: the concept's pictures with trigger captions, sample
    prompts that show it appearing over the steps, and a loradrop.toml with the light recipe.

    `anchors` pictures of the base world with their own captions bind the colour to the word:
    trained on the concept alone, a LoRA makes everything the concept's colour, the empty prompt
    included, and classifier-free guidance then steers away from it (towards its complement)."""
    folder = Path(folder)
    concept = [(s, CONCEPT.caption(s.shape, s.background)) for s in CONCEPT.scenes(images, seed)]
    known = [(s, s.caption) for s in world.scenes(anchors, seed + 1)]
    captions = dict(enumerate(c for _, c in concept + known))
    world.write_dataset(folder, [s for s, _ in concept + known], caption_of=None)
    for i, text in captions.items():
        (folder / f"{i:03d}.txt").write_text(text + "\n")
    prompts = [
        f"{p} --w {world.SIZE} --h {world.SIZE} --s 20 --l 5 --d {i + 1}"
        for i, p in enumerate(CONCEPT.prompts(2, seed))
    ]
    (folder / "sample-prompts.txt").write_text(
        "# the concept, rendered during training\n" + "\n".join(prompts) + "\n"
    )
    settings = {"name": name, **LIGHT_RECIPE, **(recipe or {})}
    if block_vector:
        settings["block_vector"] = block_vector
    (folder / "loradrop.toml").write_text(tomli_w.dumps(settings))
    return folder
