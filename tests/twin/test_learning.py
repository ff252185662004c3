"""Does a loradrop LoRA work? Known answers on the learned twin, judged by the classical judge.

The twin draws red, yellow, green and blue shapes from their captions; a LoRA trained by a real
daemon on two dozen cyan shapes captioned "zkq" (beside two dozen of the twin's own world) must
make "a zkq circle ..." cyan, keep that through resize and through a chop to the blocks
`blocks --suggest` proposes, and lose it when chopped to the other blocks. Thresholds sit a little
below the figures measured here (docs/twin.md), so sampling noise cannot flake them; every score
uses the same 32 seeded prompts.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loradrop.engine.lora.blocks import format_weight, parse_vector
from loradrop.engine.twin import score

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def vector_text(values) -> str:
    return ",".join(format_weight(v) for v in values)


@pytest.fixture(scope="module")
def scores(learned_twin, concept_run):
    final = concept_run.artifacts["final"]
    # The daemon's own suggestion: the job measured each block's effect on its sample prompts.
    analysis = json.loads(Path(concept_run.artifacts["analysis"]).read_text())
    assert analysis["suggested_by"] == "effect", analysis
    suggested = parse_vector(analysis["suggested_vector_90"])
    complement = [suggested[0]] + [1.0 - v for v in suggested[1:]]
    half = [suggested[0]] + [0.5 * v for v in suggested[1:]]
    with concept_run.daemon.client() as client:
        # Each chop is judged before the next: every chop of one file writes its "-chop" file.
        chop = lambda vector: score.concept_score(learned_twin, client.chop(final, vector_text(vector)).path)  # noqa: E731
        chopped, others = chop(suggested), chop(complement)
    return {
        "without": score.concept_score(learned_twin),
        "final": score.concept_score(learned_twin, final),
        "resized": score.concept_score(learned_twin, concept_run.artifacts["resized"]),
        "chopped": chopped,
        "others": others,
        "half": score.concept_score(learned_twin, final, vector_text(half)),
        "suggested": vector_text(suggested),
    }


def test_the_base_draws_its_world(learned_twin):
    figures = score.world_score(learned_twin)
    assert figures["colour"].share >= 0.8, figures
    assert figures["shape"].share >= 0.6, figures


def test_the_base_does_not_know_the_concept(scores):
    assert scores["without"].share <= 0.10, scores


def test_the_lora_learns_the_concept(scores):
    assert scores["final"].share >= 0.80, scores


def test_resize_keeps_what_the_lora_learned(scores):
    assert scores["resized"].share >= 0.9 * scores["final"].share, scores


def test_chop_to_the_suggested_blocks_keeps_it_and_to_the_others_loses_it(scores):
    # 85%, not resize's 90%: near-tied blocks make the suggestion vary with float rounding (docs/twin.md)
    assert scores["chopped"].share >= 0.85 * scores["final"].share, scores
    assert scores["others"].share <= 0.5 * scores["final"].share, scores


def test_block_weight_moves_the_score(scores):
    assert scores["without"].share <= scores["half"].share <= scores["final"].share, scores
    assert scores["half"].share < scores["final"].share or scores["without"].share < scores["half"].share, (
        scores
    )
