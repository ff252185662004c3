"""The job events' one vocabulary: stored as kind + fields, rebuilt as the same record, and every
record the engine or the daemon makes has its API message."""

from __future__ import annotations

import json

import pytest

from loradrop.daemon.messages import event_message
from loradrop.daemon.records import Event
from loradrop.engine import events as ev

ONE_OF_EACH = [
    ev.Log("a warning", "warning"),
    ev.Stage("train"),
    ev.Progress("train", 3, 80, loss=0.12, avg_loss=0.15, lr_unet=1e-3, rate=2.5, eta_s=31.0),
    ev.Sample("/o/j/samples/x_s000003_p00.png", 3, 0, "a zkq circle"),
    ev.Artifact("/o/j/x.safetensors", "final", 1234, 80),
    ev.StateChange("failed", "training diverged"),
    ev.PreviewProgress(1, 2, 4, 8, "r1"),
]


def test_every_kind_has_one_record():
    assert sorted(ev.TYPES) == sorted(e.KIND for e in ONE_OF_EACH)


@pytest.mark.parametrize("record", ONE_OF_EACH, ids=lambda r: r.KIND)
def test_stored_and_rebuilt_the_same(record):
    kind, fields = ev.encode(record)
    assert ev.decode(kind, json.loads(json.dumps(fields))) == record


def test_a_mistyped_field_is_an_error_not_a_default():
    kind, fields = ev.encode(ev.Progress("train", 3, 80, loss=0.1))
    fields["los"] = fields.pop("loss")
    with pytest.raises(ValueError, match="los"):
        ev.decode(kind, fields)
    with pytest.raises(ValueError, match="no event kind"):
        ev.decode("progres", {})


@pytest.mark.parametrize("record", ONE_OF_EACH, ids=lambda r: r.KIND)
def test_every_record_has_its_api_message(record):
    message = event_message(Event(7, "j1", 3, 1.0, record))
    assert message.kind == record.KIND and message.WhichOneof("body") == record.KIND  # never other_json


def test_the_api_message_carries_the_fields():
    progress = event_message(Event(1, "j", 1, 0.0, ONE_OF_EACH[2])).progress
    assert (progress.stage, progress.done, progress.total, progress.loss, progress.avg_loss) == (
        "train",
        3,
        80,
        0.12,
        0.15,
    )
    assert not progress.HasField("lr_te")  # None stays unset, never 0
    artifact = event_message(Event(1, "j", 1, 0.0, ev.Artifact("/p", "recipe", 9))).artifact
    assert (artifact.path, artifact.kind, artifact.bytes, artifact.HasField("step")) == (
        "/p",
        "recipe",
        9,
        False,
    )
