"""The caption stage, in the worker: before the engine scans a dataset, images without a caption
are captioned by the job's captioner, the trigger word put first; with `review = true` the job
is then held for a person (the worker reports outcome "review" and takes the next job).

A worker keeps the captioner it loaded (a VLM takes a while to load) for the next job that names
the same one, as its Session keeps the base model. Imported only by the worker process.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from loradrop.engine.events import Emit, Log, Progress, Stage

from .captions import missing, refuse_uncaptioned
from .records import CaptionSettings


class CaptionStage:
    def __init__(self, device: str | None):
        # The caption engines take "cpu" or "cuda" (their first GPU), not "cuda:N".
        self.device = None if device is None else "cpu" if device == "cpu" else "cuda"
        self._key: tuple[str, str] | None = None
        self._captioner = None

    def run(
        self, folder: Path, settings: CaptionSettings, extension: str, emit: Emit, check: Callable[[], None]
    ) -> bool:
        """Caption what lacks a caption; True when the job is now to wait for review."""
        if settings.accepted:
            return False  # accepted once: images still without a caption failed to caption, and are skipped by the scan
        images, lacking = missing(folder, extension)
        if not lacking:
            return False
        refuse_uncaptioned(
            folder, extension, settings
        )  # the folder changed since intake, and no captioner is set
        from loradrop.engine.caption import Existing, Outcome, caption_folder

        emit(Stage("caption"))
        emit(
            Log(
                f"{len(lacking)} of {len(images)} images have no caption; captioning them with {settings.model}"
            )
        )
        captioner = self._load(settings.model, settings.kind)

        def progress(done: int, total: int) -> None:
            emit(Progress("caption", done, total))
            if (
                done < total
            ):  # not after the last batch: a stop then would requeue a job that skips its review
                check()

        result = caption_folder(
            folder,
            captioner,
            trigger=settings.trigger or None,
            existing=Existing.KEEP,
            caption_extension=extension,
            progress=progress,
        )
        for failed in result.failed:
            emit(Log(f"caption: {failed.reason}", "warning"))
        emit(Log(result.summary()))
        return settings.review and bool(result.with_outcome(Outcome.WRITTEN))

    def _load(self, model: str, kind: str):
        from loradrop.engine.caption import (
            TaggerSpec,
            VlmSpec,
            detect_kind,
            load_captioner,
        )

        key = (model, kind)
        if key != self._key:
            self._captioner = self._key = None  # the old one goes before the new one loads
            path = Path(model)
            spec_type = {"tagger": TaggerSpec, "vlm": VlmSpec}.get(kind) or detect_kind(path)
            self._captioner, self._key = load_captioner(spec_type(path, device=self.device)), key
        return self._captioner
