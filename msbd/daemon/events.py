"""The events hub: live state-change events fanned out to subscribers, in order.

The store calls `publish` right after each commit, under its write lock, so
events arrive here in sequence order. A subscriber first registers (and
starts buffering live events), then replays the table from `since`, then
forwards buffered and live events with a larger sequence number than the last
one replayed: nothing is lost in the hand-over and nothing is sent twice. A
subscriber that falls `buffer` events behind is dropped with a final
`lagged` marker rather than let it grow the daemon's memory; it can
resubscribe with `since` and lose nothing.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import anyio
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from msbd.errors import Lagged
from msbd.model import Event

log = logging.getLogger("msbd.events")


class Subscriber:
    def __init__(self, owner_uid: int | None, buffer: int) -> None:
        self.owner_uid = owner_uid
        send: ObjectSendStream[Event]
        receive: ObjectReceiveStream[Event]
        send, receive = anyio.create_memory_object_stream[Event](buffer)
        self._send = send
        self._receive = receive
        self.lagged = False

    def offer(self, event: Event, owner_uid: int) -> None:
        if self.owner_uid is not None and owner_uid != self.owner_uid:
            return
        if self.lagged:
            return
        try:
            self._send.send_nowait(event)
        except anyio.WouldBlock:
            self.lagged = True
            self._send.close()

    async def receive(self) -> Event:
        try:
            return await self._receive.receive()
        except anyio.EndOfStream:
            raise Lagged from None

    def close(self) -> None:
        self._send.close()
        self._receive.close()


class EventHub:
    def __init__(self, *, buffer: int = 4096) -> None:
        self._subscribers: set[Subscriber] = set()
        self._buffer = buffer

    def publish(self, event: Event, owner_uid: int) -> None:
        for sub in tuple(self._subscribers):
            sub.offer(event, owner_uid)

    @asynccontextmanager
    async def subscribe(self, owner_uid: int | None) -> AsyncIterator[Subscriber]:
        """Register a subscriber; `owner_uid` None sees every sandbox's events."""
        sub = Subscriber(owner_uid, self._buffer)
        self._subscribers.add(sub)
        try:
            yield sub
        finally:
            self._subscribers.discard(sub)
            sub.close()


async def stream_events(
    hub: EventHub,
    *,
    since: int,
    owner_uid: int | None,
    replay: Callable[[int], Awaitable[list[Event]]],
    deliver: Callable[[Event], Awaitable[None]],
) -> None:
    """Replay events after `since`, then deliver live ones, until cancelled or lagged.

    `replay(after)` returns up to a page of stored events with seq > after.
    """
    async with hub.subscribe(owner_uid) as sub:
        last = since
        while page := await replay(last):
            for event in page:
                await deliver(event)
                last = event.seq
        while True:
            try:
                event = await sub.receive()
            except Lagged:
                log.warning("dropped an events subscriber that fell behind at seq %d", last)
                raise
            if event.seq > last:
                await deliver(event)
                last = event.seq
