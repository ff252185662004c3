"""`make eval`: the known-answer figures of the learned twin, each beside its baseline.

    python -m loradrop.engine.twin.evaluate [--model CKPT] [--keep DIR]

Runs the whole job offline, as a worker runs it (train a concept LoRA from a dropped-style
folder with the light recipe, resize, analyse), chops the result to the blocks
`blocks --suggest --effect` proposes, to the others, and to the blocks of most energy, and scores
every file with the judge on 32 seeded samples.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from ..jobspec import JobSpec
    from ..lora.blocks import energy, format_weight, parse_vector, suggest
    from ..lora.chop import chop
    from ..models.sdxl import load_sdxl
    from ..models.tiny import default_model_path
    from ..recipe import Recipe
    from ..session import Session
    from . import score
    from .concept import CONCEPT, LIGHT_RECIPE, write_concept_dataset

    parser = argparse.ArgumentParser(
        prog="python -m loradrop.engine.twin.evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model", default=None, help="the twin to judge (default: the embedded learned twin)"
    )
    parser.add_argument("--keep", type=Path, default=None, help="keep the dataset and the job's files here")
    args = parser.parse_args(argv)

    root = args.keep or Path(tempfile.mkdtemp(prefix="loradrop-eval-"))
    model_path = args.model or str(default_model_path())
    dataset = write_concept_dataset(root / "zkq-shapes")
    recipe = Recipe.from_mapping({**LIGHT_RECIPE, "log_with": "none"})
    print(
        f"training a '{CONCEPT.trigger}' = {CONCEPT.colour} LoRA on {model_path} ({recipe.max_train_steps} steps) in {root}",
        flush=True,
    )
    spec = JobSpec(
        job_id="eval",
        name="zkq-shapes",
        dataset=dataset,
        out_dir=root / "job",
        recipe=recipe.to_dict(),
        model=args.model,
    )
    result = Session().run(spec, emit=lambda event: None)

    model = load_sdxl(model_path)
    text = lambda values: ",".join(format_weight(v) for v in values)  # noqa: E731
    by_energy = suggest(energy(result.final).shares, 0.9)
    # The job's suggestion, by effect on the prompts it sampled (its recipe's suggest_by).
    suggested = parse_vector(json.loads((root / "job" / "blocks.json").read_text())["suggested_vector_90"])
    others = [suggested[0]] + [1.0 - v for v in suggested[1:]]
    half = [suggested[0]] + [0.5 * v for v in suggested[1:]]
    chopped = chop(result.final, text(suggested), root / "job" / "suggested.safetensors").path
    rest = chop(result.final, text(others), root / "job" / "others.safetensors").path
    energy_chop = chop(result.final, text(by_energy), root / "job" / "by-energy.safetensors").path

    world = score.world_score(model)
    without = score.concept_score(model)
    final = score.concept_score(model, result.final)
    rows = [
        ("the base draws its captions' colour", world["colour"], "chance 25%"),
        ("... and shape", world["shape"], "chance 33%"),
        (f"'{CONCEPT.trigger}' is {CONCEPT.colour}, no LoRA", without, "must stay <= 10%"),
        ("... with the trained LoRA", final, f"no LoRA {without}"),
        ("... resized", score.concept_score(model, result.resized), f"trained {final}"),
        (
            f"... chopped to the blocks of most effect {text(suggested)}",
            score.concept_score(model, chopped),
            f"trained {final}",
        ),
        ("... chopped to the other blocks", score.concept_score(model, rest), f"trained {final}"),
        (
            f"... chopped to the high-energy blocks {text(by_energy)}",
            score.concept_score(model, energy_chop),
            f"trained {final}",
        ),
        (
            "... suggested blocks at weight 0.5",
            score.concept_score(model, result.final, text(half)),
            f"1.0: {final}, 0: {without}",
        ),
    ]
    width = max(len(r[0]) for r in rows)
    for label, value, baseline in rows:
        print(f"{label:<{width}}  {str(value):>12}   {baseline}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
