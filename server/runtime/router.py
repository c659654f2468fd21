"""Outputs from the tick thread to the asyncio loops of the front doors.

A stream's items go to its `Mailbox` (its loop and queue). One tick routes
outputs for many streams, often on one loop: `route` wakes each loop once
with all of its items, because a thread-safe call per item costs a
syscall each (hundreds a second at load).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterable
from typing import Any


@dataclasses.dataclass(frozen=True, slots=True)
class Mailbox:
    """Where one stream's items go: put on `queue`, from `loop`'s thread."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Any]


def route(deliveries: Iterable[tuple[Mailbox, Any]]) -> None:
    """Puts each item on its mailbox's queue, in order, with one thread-safe
    call per event loop. Callers hold the engine's lock, so items a stream
    gets later (an `Ended` after `end()`) cannot overtake these."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[Any], Any]]] = {}
    for mailbox, item in deliveries:
        items = by_loop.get(mailbox.loop)
        if items is None:
            items = by_loop[mailbox.loop] = []
        items.append((mailbox.queue, item))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, items)
        except RuntimeError:  # the loop is closed: its streams' client is gone
            pass


def _put_all(items: list[tuple[asyncio.Queue[Any], Any]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)
