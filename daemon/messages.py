"""The API's messages made from the daemon's records: jobs, events, images."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import tomli_w

from loradrop.proto.v1 import loradrop_pb2 as pb

from .errors import RequestError
from .store import Event, Job


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
        progress=_progress(job.progress) if job.progress else None,
        out_dir=str(out_dir),
        final=job.result.get("final") or "",
        resized=job.result.get("resized") or "",
        chopped=job.result.get("chopped") or "",
        last_seq=job.last_seq,
        captioner=(job.captions or {}).get("model") or "",
        trigger=(job.captions or {}).get("trigger") or "",
        review=bool((job.captions or {}).get("review")),
    )


def event_message(event: Event) -> pb.Event:
    message = pb.Event(seq=event.seq, global_seq=event.gseq, job_id=event.job_id, time=event.time, kind=event.kind)
    p = event.payload
    kind = event.kind
    if kind == "log":
        message.log.CopyFrom(pb.LogLine(level=str(p.get("level", "info")), text=str(p.get("text", ""))))
    elif kind == "stage":
        message.stage.CopyFrom(pb.StageChange(stage=str(p.get("stage", ""))))
    elif kind == "progress":
        message.progress.CopyFrom(_progress(p))
    elif kind == "sample":
        message.sample.CopyFrom(pb.SampleReady(path=str(p.get("path", "")), step=int(p.get("step") or 0), prompt_index=int(p.get("prompt_index") or 0), prompt=str(p.get("prompt", ""))))
    elif kind == "artifact":
        step = p.get("step")
        message.artifact.CopyFrom(pb.ArtifactReady(path=str(p.get("path", "")), kind=str(p.get("kind", "")), bytes=int(p.get("bytes") or 0), step=None if step is None else int(step)))
    elif kind == "state":
        message.state.CopyFrom(pb.StateChange(state=pb.JobState.Value(str(p.get("state", "")).upper()), error=str(p.get("error", ""))))
    elif kind == "preview":
        message.preview.CopyFrom(pb.PreviewProgress(request_id=str(p.get("request_id", "")), **{k: int(p.get(k) or 0) for k in ("image", "images", "step", "steps")}))
    else:
        message.other_json = json.dumps(p)
    return message


def image_message(path: Path, max_size: int) -> pb.Image:
    from PIL import Image

    try:
        with Image.open(path) as image:
            original = image.size
            if original[0] * original[1] > Image.MAX_IMAGE_PIXELS:  # decoded here, in the server: refuse bombs first
                raise RequestError(f"{path} is {original[0]}x{original[1]}, too large to send as a sample.")
            image.load()
            if max_size and max(original) > max_size:
                image.thumbnail((max_size, max_size), Image.Resampling.LANCZOS)
            out = io.BytesIO()
            image.save(out, format="PNG")
            size = image.size
    except RequestError:
        raise
    # Pillow reports bad data with many exception types (SyntaxError, ValueError, its
    # DecompressionBombError...); all mean the same here.
    except Exception as e:
        raise RequestError(f"{path} is not a readable image ({str(e) or type(e).__name__}).") from None
    return pb.Image(path=str(path), png=out.getvalue(), width=size[0], height=size[1], original_width=original[0], original_height=original[1])


def _progress(p: dict[str, Any]) -> pb.Progress:
    optional = {k: float(p[k]) for k in ("loss", "avg_loss", "lr_unet", "lr_te", "rate", "eta_s") if p.get(k) is not None}
    return pb.Progress(stage=str(p.get("stage", "")), done=int(p.get("done") or 0), total=int(p.get("total") or 0), **optional)
