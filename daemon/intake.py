"""How a dataset folder becomes a job: checked, its settings resolved and frozen, recorded.

Settings come in three layers: the Recipe's defaults, then the folder's `loradrop.toml` (recipe
keys at the top level, plus `name`, `model`, `block_vector`, `pin` (a Ray resource the job's node
must offer) and the caption stage's keys, see captions.py), then the request's own values.
The result is stored with the job and never read again from the folder, so editing the folder's
file later does not change a queued job. Everything that can be judged without torch is judged
here, before any training: every setting's type and range, the block vector's length (a LoRA
trained here has 21 entries), the sample prompts' sizes and steps; the worker checks the resize
recipe before it starts.

Folders of the inbox are known by their inode (`folder_key`): that survives renames, and it is how
a restarted daemon knows a folder it has already taken.
"""

from __future__ import annotations

import errno
import io
import logging
import re
import shutil
import stat
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from loradrop.engine.data.prompts import parse_prompt_file
from loradrop.engine.events import Log
from loradrop.engine.recipe import Recipe, check_block_vector, load_toml
from loradrop.errors import UserError

from . import captions
from .config import DaemonConfig
from .errors import Conflict, DiskFull, Refused, RequestError
from .events import EventLog
from .home import Home
from .records import CANCELLED, FAILED, QUEUED, REVIEW, RUNNING, WAITING, CaptionSettings, Job
from .security import printable, refuse_links_out, resolve_inside, safe_name

log = logging.getLogger(__name__)

FOLDER_FILE = "loradrop.toml"
FOLDER_KEYS = ("name", "model", "block_vector", "pin")  # the folder file's keys that are not recipe keys
# A Ray resource name as a pin may give it: a node's label ("big") or Ray's "accelerator_type:H100".
_PIN = re.compile(r"[A-Za-z0-9_.:-]{1,100}")
UPLOAD_LIMIT = 8 << 30  # bytes of tar stream one upload may send


@dataclass(frozen=True)
class Request:
    """What a client (or the inbox) asks for; empty strings mean "not given"."""

    overrides: tuple[str, ...] = ()
    name: str = ""
    model: str = ""
    block_vector: str = ""


@dataclass(frozen=True)
class Settings:
    name: str
    model: str | None
    block_vector: str | None
    recipe: dict
    captions: CaptionSettings
    pin: str  # "": any node


def folder_key(path: Path) -> str:
    st = path.stat(follow_symlinks=False)
    return f"{st.st_dev}:{st.st_ino}"


class Intake:
    def __init__(self, home: Home, config: DaemonConfig, events: EventLog, wake):
        self.home, self.config, self.events = home, config, events
        self._wake = wake  # called when a job was queued, so an idle worker takes it

    # ------------------------------------------------------------------ requests

    def submit(self, dataset: str, request: Request) -> Job:
        """A folder already inside the inbox, named by a client."""
        folder = resolve_inside(dataset, [self.home.inbox], what="dataset")
        if folder.parent != self.home.inbox:
            raise Refused(
                f"dataset {dataset!r} must be a folder directly inside the inbox ({self.home.inbox})."
            )
        self._check_folder(folder)
        settings = self.resolve(folder, request, default_name=folder.name)
        key = folder_key(folder)
        for job in self.events.store.inbox_jobs(key):
            if job.state in (QUEUED, RUNNING, REVIEW) and (
                job.name,
                job.model,
                job.block_vector,
                job.recipe,
                job.pin,
            ) == (settings.name, settings.model, settings.block_vector, settings.recipe, settings.pin):
                raise Conflict(
                    f"{folder.name} is {job.state} already as job {job.id}, with the same settings; wait for it, "
                    f"cancel it (`loradrop cancel {job.id}`), or give another --name to train it twice."
                )
        return self._queue(settings, source="submit", dataset=folder, key=key)

    def upload(self, first: Request, folder_name: str, data: Iterator[bytes]) -> Job:
        """A tar stream unpacked into a new inbox folder (a hidden one until it is complete)."""
        name = safe_name(folder_name or first.name, fallback="upload")
        staging = None
        try:
            staging = Path(tempfile.mkdtemp(prefix=".upload-", dir=self.home.inbox))
            with tarfile.open(fileobj=_Stream(data, UPLOAD_LIMIT), mode="r|") as tar:
                # The "data" filter refuses absolute names, `..`, links out of the folder and devices.
                tar.extractall(staging, filter="data")
            settings = self.resolve(staging, first, default_name=name, shown=name)
            final = _free_name(self.home.inbox, name)
            job = self._queue(settings, source="upload", dataset=final, key=folder_key(staging), wake=False)
            staging.rename(final)  # after the job exists, so the watcher knows the folder as taken
        except tarfile.TarError as e:
            raise RequestError(f"the upload is not a valid tar stream of a folder ({e}).") from None
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise DiskFull(
                f"disk full: no space left in the inbox ({self.home.inbox}) for the upload; free some space and send it again."
            ) from None
        finally:
            if staging is not None and staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        self._wake()
        return job

    def retry(self, job: Job) -> Job:
        if job.state not in (FAILED, CANCELLED):
            raise Conflict(f"job {job.id} is {job.state}; only a failed or cancelled job can be retried.")
        if job.recipe is None:
            # Refused at intake: read the folder again, the user may have fixed it.
            folder = Path(job.dataset)
            self._check_folder(folder)
            settings = self.resolve(folder, Request(name=job.name), default_name=job.name)
            self.events.store.set_settings(
                job.id,
                settings.model,
                settings.block_vector,
                settings.recipe,
                settings.captions,
                settings.pin,
            )
        retried = self.events.transition(job.id, QUEUED, expect=(FAILED, CANCELLED), attempts=0)
        if retried is None:
            raise Conflict(f"job {job.id} changed state meanwhile; look at it again.")
        self._wake()
        return retried

    # ------------------------------------------------------------------ the inbox watcher's calls

    def known(self, key: str) -> bool:
        return bool(self.events.store.inbox_jobs(key))

    def folder_ready(self, folder: Path, key: str) -> None:
        """A new inbox folder has been quiet long enough: queue it, or record why it cannot be."""
        try:
            self._check_folder(folder)
            settings = self.resolve(folder, Request(), default_name=folder.name)
        except UserError as e:
            error = printable(str(e))
            job = self.events.add_job(
                name=safe_name(folder.name),
                source="inbox",
                dataset=printable(str(folder)),
                inbox_key=key,
                model=None,
                block_vector=None,
                recipe=None,
                state=FAILED,
                error=error,
            )
            self.events.emit(
                "", Log(f"inbox: {printable(folder.name)} refused as job {job.id}: {error}", "warning")
            )
            log.warning("inbox folder %s refused: %s", printable(str(folder)), error)
            return
        self._queue(settings, source="inbox", dataset=folder, key=key)

    def folder_moved(self, key: str, folder: Path) -> None:
        for job in self.events.store.inbox_jobs(key):
            self.events.store.set_inbox(job.id, printable(str(folder)), key)

    def folder_removed(self, key: str) -> None:
        """A folder gone before its job started cancels the job; the key is freed either way
        (a new folder may get the same inode)."""
        for job in self.events.store.inbox_jobs(key):
            if job.state in WAITING:
                self.events.transition(
                    job.id, CANCELLED, error="its folder was removed from the inbox", expect=WAITING
                )
            self.events.store.set_inbox(job.id, job.dataset, None)

    def forget_missing(self, present: set[str]) -> None:
        """At start: free the keys of folders that went away while the daemon was down."""
        for job in self.events.store.jobs():
            if job.inbox_key and job.inbox_key not in present:
                self.folder_removed(job.inbox_key)

    # ------------------------------------------------------------------ resolution

    def resolve(
        self, folder: Path, request: Request, *, default_name: str, shown: str | None = None
    ) -> Settings:
        """The job's frozen settings: recipe defaults < the folder's loradrop.toml < the request.
        `shown`: the folder's name in sentences, for an upload still in its hidden staging folder."""
        values: dict = {}
        source = folder / FOLDER_FILE
        if _regular_file(source, "a TOML file of recipe settings"):
            values = load_toml(source)
        caption = captions.resolve(
            values,
            source,
            captioner=self.config.captioner,
            captioner_kind=self.config.captioner_kind,
            model_path=self.caption_model_path,
        )
        extra = {k: values.pop(k) for k in FOLDER_KEYS if k in values}
        for key, value in extra.items():
            if not isinstance(value, str):
                raise UserError(f"{source}: {key} must be a string, not {value!r}.")
        recipe = Recipe.from_mapping(values, source=str(source)).with_overrides(
            list(request.overrides), source="request"
        )
        name = safe_name(request.name or extra.get("name") or values.get("output_name") or default_name)
        recipe = recipe.updated({"output_name": name}, source="request")
        vector = request.block_vector or extra.get("block_vector") or None
        if vector:  # refused now, not after the whole job has trained
            check_block_vector(
                vector, "the request's block_vector" if request.block_vector else f"{source}: block_vector"
            )
        pin = extra.get("pin", "")
        if pin and not _PIN.fullmatch(pin):
            raise UserError(
                f"{source}: pin {pin!r} is not a Ray resource name; give at most 100 letters, digits and _-.: "
                '(a node\'s label such as "big", or "accelerator_type:H100"), or remove it to run on any node.'
            )
        prompts = folder / recipe.sample_prompts
        if recipe.sample_every_n_steps and _regular_file(prompts, "a text file of sample prompts"):
            parse_prompt_file(
                prompts, lambda _warning: None
            )  # a sample past the size or step limits is refused
        # Before any worker: a folder with uncaptioned images and nothing to caption them fails now.
        captions.refuse_uncaptioned(folder, recipe.caption_extension, caption, shown)
        return Settings(
            name=name,
            model=self.model_path(request.model or extra.get("model", "")),
            block_vector=vector,
            recipe=recipe.to_dict(),
            captions=caption,
            pin=pin,
        )

    def caption_model_path(self, text: str) -> Path:
        """A loradrop.toml's caption_model: a tagger or VLM folder (or .onnx file) in models/, or
        the daemon's own --captioner; a folder file may not load models from elsewhere."""
        if self.config.captioner and text == self.config.captioner:
            return Path(text)
        path = resolve_inside(text, [self.home.models], what="caption model", base=self.home.models)
        if not path.exists():
            raise RequestError(
                f"caption model {text!r} is not in {self.home.models}; copy the tagger or VLM folder there first."
            )
        return path

    def model_path(self, text: str) -> str | None:
        """A base checkpoint a request may use: a file in models/ (by name or path), or the
        daemon's own --model; empty: the daemon's default (None: the tiny twin)."""
        if not text:
            return self.config.model
        if self.config.model and text == self.config.model:
            return text
        path = resolve_inside(
            text, [self.home.models, self.home.outputs], what="model", base=self.home.models
        )
        if not path.is_file():
            raise RequestError(
                f"model {text!r} is not a file in {self.home.models}; copy the checkpoint there first."
            )
        return str(path)

    def _check_folder(self, folder: Path) -> None:
        if printable(str(folder)) != str(folder):
            raise RequestError(f"the name of {printable(str(folder))} is not valid UTF-8; rename the folder.")
        refuse_links_out(folder, self.home.inbox)
        if not folder.is_dir():
            raise RequestError(
                f"dataset {folder} is not a folder (any more); give a folder of images inside the inbox."
            )

    def _queue(
        self, settings: Settings, *, source: str, dataset: Path, key: str | None, wake: bool = True
    ) -> Job:
        job = self.events.add_job(
            name=settings.name,
            source=source,
            dataset=str(dataset),
            inbox_key=key,
            model=settings.model,
            block_vector=settings.block_vector,
            recipe=settings.recipe,
            captions=settings.captions,
            pin=settings.pin,
        )
        if wake:
            self._wake()
        return job


def _regular_file(path: Path, what: str) -> bool:
    """Whether the folder has this file; one that is there but not a regular file (a FIFO would
    hang the reader, a folder would be silently ignored) is refused."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return False
    except OSError as e:
        raise UserError(f"{path} cannot be read ({e.strerror}); fix or remove it.") from None
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
        raise UserError(f"{path} is {kind}, not {what}; replace it with a file or remove it.")
    return True


def _free_name(parent: Path, name: str) -> Path:
    candidate, n = parent / name, 1
    while candidate.exists() or candidate.is_symlink():
        n += 1
        candidate = parent / f"{name}-{n}"
    return candidate


class _Stream(io.RawIOBase):
    """The upload's chunks as a readable file, for tarfile's streaming mode."""

    def __init__(self, chunks: Iterator[bytes], limit: int):
        self._chunks, self._limit = chunks, limit
        self._buffer, self._total = b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self._buffer:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._total += len(chunk)
            if self._total > self._limit:
                raise RequestError(
                    f"the upload is larger than {self._limit >> 30} GiB; copy the folder into the inbox instead."
                )
            self._buffer = chunk
        n = min(len(b), len(self._buffer))
        b[:n] = self._buffer[:n]
        self._buffer = self._buffer[n:]
        return n
