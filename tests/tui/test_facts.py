"""What the queue and the job's title say about a job: the stage it is in, one loss (the running
average, labelled), the ETA counting down between steps, and what a done job left."""

from __future__ import annotations

from loradrop.proto.v1 import loradrop_pb2 as pb
from loradrop.tui.facts import Seen, eta_text, job_line, steps_text, title_parts


def event(seq: int, **body) -> pb.Event:
    return pb.Event(seq=seq, job_id="0001-cats", time=1000.0 + seq, **body)


def train(done: int, loss: float, avg: float, eta: float) -> pb.Progress:
    return pb.Progress(stage="train", done=done, total=80, loss=loss, avg_loss=avg, eta_s=eta)


def test_a_new_stage_shows_before_its_first_step():
    job = pb.Job(id="0001-cats", state=pb.RUNNING, progress=pb.Progress(stage="cache", done=8, total=8))
    seen = Seen()
    seen.learn(event(5, progress=job.progress), now=0.0, wall=1005.0)
    assert steps_text(job, seen) == "cache 8/8"
    seen.learn(
        event(6, stage=pb.StageChange(stage="train")), now=1.0, wall=1006.0
    )  # the first step takes a while
    assert steps_text(job, seen) == "train …"
    title = "  ·  ".join(title_parts(job, seen, now=2.0))
    assert "cache" not in title and "train …" in title


def test_one_loss_the_running_average_labelled_and_an_eta_that_counts_down():
    p = train(12, loss=0.31, avg=0.12, eta=100.0)
    job = pb.Job(id="0001-cats", state=pb.RUNNING, progress=p)
    seen = Seen()
    seen.learn(event(20, progress=p), now=50.0, wall=1020.0)
    title = title_parts(job, seen, now=50.0)
    assert "avg loss 0.1200" in title and not any("0.31" in part for part in title)
    assert eta_text(job, seen, now=50.0) == "01:40"
    assert eta_text(job, seen, now=80.0) == "01:10"  # 30 s later, no new step yet
    assert eta_text(job, seen, now=500.0) == "00:00"
    replayed = Seen()  # the same event read again 40 s after it happened (a screen opened later)
    replayed.learn(event(20, progress=p), now=50.0, wall=1060.0)
    assert eta_text(job, replayed, now=50.0) == "01:00"


def test_a_done_job_says_done_its_final_loss_and_its_files():
    last_train = train(80, loss=0.2, avg=0.0931, eta=0.0)
    job = pb.Job(
        id="0001-cats",
        state=pb.DONE,
        progress=pb.Progress(stage="resize", done=876, total=876),
        final="/o/0001-cats/cats.safetensors",
        resized="/o/0001-cats/cats-resized.safetensors",
    )
    seen = Seen()
    for seq, p in enumerate([last_train, job.progress], start=90):
        seen.learn(event(seq, progress=p), now=1.0, wall=1100.0)
    assert steps_text(job, seen) == "80/80"
    title = title_parts(job, seen, now=2.0)
    assert title[1:] == ["done", "80 steps", "avg loss 0.0931", "cats-resized.safetensors"]
    line = job_line(job, seen)
    assert (
        line
        == "0001-cats done: 80 steps, avg loss 0.0931  ·  cats-resized.safetensors (resized), cats.safetensors (final)"
    )


def test_a_long_stage_count_fits_the_queue_column():
    job = pb.Job(id="0001-cats", state=pb.RUNNING, progress=pb.Progress(stage="resize", done=438, total=876))
    assert steps_text(job, Seen()) == "resize 50%"
    assert (
        steps_text(pb.Job(state=pb.RUNNING, progress=pb.Progress(stage="resize", done=4, total=8)), Seen())
        == "resize 4/8"
    )


def test_loradrop_jobs_labels_the_same_loss_as_the_queue():
    """`loradrop jobs` printed the step's own loss as "loss" while the queue showed the running
    average: one word, two numbers."""
    from loradrop.commands.jobs import job_line as jobs_line

    p = train(12, loss=0.31, avg=0.12, eta=65.0)
    job = pb.Job(id="0007-cats", state=pb.RUNNING, progress=p)
    listed = jobs_line(job).split()
    assert listed == ["0007-cats", "running", "train", "12/80", "avg", "loss", "0.1200", "ETA", "01:05"]
    seen = Seen()
    seen.learn(event(20, progress=p), now=50.0, wall=1020.0)
    assert "avg loss 0.1200" in title_parts(job, seen, now=50.0)  # the header's words and number
