"""The API's messages made from the daemon's records: jobs, events, images."""

from __future__ import annotations

from pathlib import Path

import tomli_w

from loradrop.engine import events as ev
from loradrop.proto.v1 import loradrop_pb2 as pb

from .records import Event, Job


def job_message(job: Job, out_dir: Path) -> pb.Job:
    return pb.Job(
        id=job.id,
        number=job.number,
        name=job.name,
        state=pb.JobState.Value(job.state.upper()),
        source=job.source,
        dataset=job.dataset,
        model=job.model or "",
        block_vector=job.block_vector or "",
        recipe_toml=tomli_w.dumps(job.recipe) if job.recipe else "",
        created=job.created,
        started=job.started or 0.0,
        ended=job.ended or 0.0,
        error=job.error,
        attempts=job.attempts,
        progress=progress_message(job.progress) if job.progress else None,
        out_dir=str(out_dir),
        final=job.result.final,
        resized=job.result.resized,
        chopped=job.result.chopped,
        last_seq=job.last_seq,
        captioner=job.captions.model or "" if job.captions else "",
        trigger=job.captions.trigger if job.captions else "",
        review=bool(job.captions and job.captions.review),
    )


def event_message(event: Event) -> pb.Event:
    message = pb.Event(
        seq=event.seq, global_seq=event.gseq, job_id=event.job_id, time=event.time, kind=event.kind
    )
    match event.body:
        case ev.Log(text, level):
            message.log.CopyFrom(pb.LogLine(level=level, text=text))
        case ev.Stage(stage):
            message.stage.CopyFrom(pb.StageChange(stage=stage))
        case ev.Progress() as progress:
            message.progress.CopyFrom(progress_message(progress))
        case ev.Sample(path, step, prompt_index, prompt):
            message.sample.CopyFrom(
                pb.SampleReady(path=path, step=step, prompt_index=prompt_index, prompt=prompt)
            )
        case ev.Artifact(path, kind, size, step):
            message.artifact.CopyFrom(pb.ArtifactReady(path=path, kind=kind, bytes=size, step=step))
        case ev.StateChange(state, error):
            message.state.CopyFrom(pb.StateChange(state=pb.JobState.Value(state.upper()), error=error))
        case ev.PreviewProgress(image, images, step, steps, request_id):
            message.preview.CopyFrom(
                pb.PreviewProgress(request_id=request_id, image=image, images=images, step=step, steps=steps)
            )
        case other:
            raise TypeError(f"no API message for {other!r}")
    return message


def progress_message(p: ev.Progress) -> pb.Progress:
    optional = {
        k: float(getattr(p, k))
        for k in ("loss", "avg_loss", "lr_unet", "lr_te", "rate", "eta_s")
        if getattr(p, k) is not None
    }
    return pb.Progress(stage=p.stage, done=p.done, total=p.total, **optional)
