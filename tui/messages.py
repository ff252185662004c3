"""Messages between the event feeds (threads), the app and the screens."""

from __future__ import annotations

import threading
from collections import deque
from typing import Callable

from textual.message import Message

from loradrop.proto.v1 import loradrop_pb2 as pb


class EventsArrived(Message, bubble=False):
    """New events of a feed are waiting in its `EventBatch`; the handler takes them all at once."""

    def __init__(self, batch: "EventBatch"):
        super().__init__()
        self.batch = batch


class LinkChanged(Message, bubble=False):
    """The daemon went away (`up` False: the feed is reconnecting) or answers again."""

    def __init__(self, up: bool, detail: str = ""):
        super().__init__()
        self.up, self.detail = up, detail


class JobUpdated(Message, bubble=False):
    """The app learnt something new about a job (its state, its progress); sent to every screen."""

    def __init__(self, job: pb.Job):
        super().__init__()
        self.job = job


class PreviewProgressed(Message, bubble=False):
    """A preview the daemon renders has come a step further; sent to every screen."""

    def __init__(self, progress: pb.PreviewProgress):
        super().__init__()
        self.progress = progress


class EventBatch:
    """Events handed over from a feed's thread, taken in batches by the UI.

    At 1,000 log lines a second a message per event would flood the message queue and delay key
    presses; instead one `EventsArrived` is in flight at a time and its handler drains the lot."""

    def __init__(self, post: Callable[[Message], object]):
        self._post = post
        self._events: deque[pb.Event] = deque()
        self._lock = threading.Lock()

    def put(self, event: pb.Event) -> None:
        with self._lock:
            wake = not self._events
            self._events.append(event)
        if wake:
            self._post(EventsArrived(self))

    def take(self) -> list[pb.Event]:
        with self._lock:
            events = list(self._events)
            self._events.clear()
        return events
