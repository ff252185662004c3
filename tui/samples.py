"""A job's samples, indexed by training step and by prompt, from its "sample" events.

Shared by the job screen's gallery and montage and by `loradrop montage`. It imports no Textual.
"""

from __future__ import annotations

from dataclasses import dataclass

from loradrop.proto.v1 import loradrop_pb2 as pb


@dataclass(frozen=True)
class Sample:
    seq: int  # the job's event number: GetSample(job_id, seq) fetches it
    step: int
    prompt_index: int
    prompt: str
    path: str


class SampleIndex:
    def __init__(self):
        self._by_key: dict[tuple[int, int], Sample] = {}
        self._prompts: dict[int, str] = {}

    def add(self, event: pb.Event) -> Sample | None:
        """Record a "sample" event (other events: None). A later sample of the same step and prompt
        (a retried job renders it again) replaces the earlier one."""
        if not event.HasField("sample"):
            return None
        s = event.sample
        sample = Sample(event.seq, s.step, s.prompt_index, s.prompt, s.path)
        self._by_key[(s.step, s.prompt_index)] = sample
        self._prompts[s.prompt_index] = s.prompt
        return sample

    def __len__(self) -> int:
        return len(self._by_key)

    @property
    def steps(self) -> list[int]:
        """Steps with samples, newest first."""
        return sorted({step for step, _ in self._by_key}, reverse=True)

    @property
    def prompts(self) -> list[int]:
        return sorted(self._prompts)

    def prompt(self, index: int) -> str:
        return self._prompts.get(index, "")

    def at(self, step: int, prompt_index: int) -> Sample | None:
        return self._by_key.get((step, prompt_index))

    def series(self, prompt_index: int) -> list[Sample]:
        """One prompt's samples over training, oldest step first: the montage's frames."""
        return sorted((s for (_, p), s in self._by_key.items() if p == prompt_index), key=lambda s: s.step)
