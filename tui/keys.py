"""Keys handled in the order they were typed, each on the state the key before it left.

Textual hands a key to the widget with focus through that widget's message queue and runs the
key's binding when it bubbles back to the app, while the next key is already being read: with
keys sent in one write (type-ahead over a slow ssh link, `tmux send-keys Down Enter`) `down enter`
opened the row the cursor had been on, and a key after one that opens a screen reached the old
screen, or a new one still composing itself.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

from textual import events
from textual.app import App
from textual.dom import DOMNode
from textual.widgets import Input


class KeysInOrder(App):
    """An app whose keys wait their turn: each key's handling is a callback queued behind the
    messages the key before it posted (focus changes, a new screen), and it runs the key's binding
    itself, on the screen and focus those left."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._keys: deque[events.Key] = deque()  # typed, not yet handled
        self._keyed_screen: DOMNode | None = None  # the screen the last key was handled on

    async def on_event(self, event: events.Event) -> None:
        """A key typed joins the others waiting; the rest goes Textual's way."""
        if isinstance(event, events.Key) and not event.is_forwarded:
            self._keys.append(event)
            if len(self._keys) == 1:
                self.call_later(self._next_key)
            return
        await super().on_event(event)

    async def _next_key(self) -> None:
        if self.screen is not self._keyed_screen:
            # The last key opened (or closed) a screen: let it settle, then go behind what it
            # asked of the app meanwhile (its focus, set in on_mount) before handling the key.
            await self._settle(rounds=3)
            self._keyed_screen = self.screen
            self.call_later(self._next_key)
            return
        await self._settle(rounds=1)
        event = self._keys.popleft()
        try:
            focused = self.focused
            if isinstance(focused, Input) and event.is_printable:
                await self._typed_into(focused, event)
            elif not (
                await self._check_bindings(event.key, priority=True) or await self._check_bindings(event.key)
            ):
                await super().on_event(event)  # no binding: to the widget with focus, as Textual does
        finally:
            if self._keys:
                self.call_later(self._next_key)

    async def _settle(self, rounds: int, timeout: float = 2.0) -> None:
        """Let the screen's widgets handle what is queued for them, `rounds` times (one widget's
        messages post another's; a new screen composes and mounts in its own tasks, its tabs
        pick their tab a message later). The pilot waits for a screen the same way."""
        deadline = time.monotonic() + timeout
        while not self.screen.is_mounted and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        for _ in range(rounds):
            nodes = list(self.screen.walk_children(with_self=True))
            left = len(nodes)
            done = asyncio.Event()

            def one_done() -> None:
                nonlocal left
                left -= 1
                if left <= 0:
                    done.set()

            left -= sum(not node.call_later(one_done) for node in nodes)  # a closing node runs nothing
            if left <= 0:
                continue
            try:
                await asyncio.wait_for(done.wait(), max(deadline - time.monotonic(), 0.01))
            except asyncio.TimeoutError:
                return  # a widget is busy for long: go on rather than hold every key up

    async def _typed_into(self, field: Input, event: events.Key, timeout: float = 1.0) -> None:
        """A character for a text field: forwarded to it, and waited for, so the key after it
        (enter, say) sees the text with it."""
        handled = asyncio.Event()
        field.message_signal.subscribe(
            self, lambda message: message is event and handled.set(), immediate=True
        )
        try:
            await super().on_event(event)
            await asyncio.wait_for(handled.wait(), timeout)
        except asyncio.TimeoutError:
            pass  # it is still typed; only its order with the next key is no longer sure
        finally:
            field.message_signal.unsubscribe(self)
