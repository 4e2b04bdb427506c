"""Flow control of one connection: the read gate and the write gate.

The read gate is the transport's reading switch. The protocol decides when
it should be open (its task runs, it is not closing, the client has not
sent EOF, it may take more calls, the server is not draining, the client
reads its replies); `set_reading` only makes the transport agree, asking
the transport for its state, never trusting a flag: uvloop starts reading
only after `connection_made` returns, undoing a pause made there.

The write gate follows the transport's `pause_writing`/`resume_writing`
(its buffer passed the high-water mark, then drained). Replies are written
whatever the gate says, whole frames in order: a call's reply is bounded,
and the protocol stops reading new calls while the gate is shut. Only
notifications, which a handler may send without bound, wait for it
(`wait_writable`). `paused_at` starts the watchdog's send clock.
"""

from __future__ import annotations

import asyncio

import anyio


class FlowControl:
    """The read and write gates of one connection's transport."""

    __slots__ = ("_transport", "_writable", "closed", "paused_at", "write_paused")

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._writable = anyio.Event()
        self.write_paused = False
        self.paused_at: float | None = None  # loop time the write gate shut
        self.closed = False

    def attach(self, transport: asyncio.Transport) -> None:
        self._transport = transport

    def set_reading(self, want: bool) -> None:
        """Open or shut the read gate (nothing to do before connecting or once closing)."""
        transport = self._transport
        if transport is None or transport.is_closing() or want == transport.is_reading():
            return
        if want:
            transport.resume_reading()
        else:
            transport.pause_reading()

    def pause_writing(self, now: float) -> None:
        self.write_paused = True
        self._writable = anyio.Event()
        self.paused_at = now

    def resume_writing(self) -> None:
        self.write_paused = False
        self.paused_at = None
        self._writable.set()

    def close(self) -> None:
        """The connection is closing: wake every writer waiting, for good."""
        self.closed = True
        self._writable.set()

    async def wait_writable(self) -> None:
        """Return once the write gate is open, or the connection closed."""
        while self.write_paused and not self.closed:
            await self._writable.wait()
