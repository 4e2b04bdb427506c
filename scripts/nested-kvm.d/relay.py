"""Relays one of CMD's streams from its virtio serial port to our stdout or stderr.

The guest frames its markers as NUL, "nkvm:", the run's random token, ":", an event, NUL
(events: "start", "exit=N", "end"). They are cut out of the stream; everything else is
written through unchanged and at once, except a tail that could be the beginning of a
marker, which waits for the next chunk (or the end). So a CMD whose last bytes so far are
not a NUL is never delayed.
"""

from __future__ import annotations

import os

MAX_EVENT = 64  # longer than any event: a frame that does not close by then is data


class Stream:
    def __init__(self, fd: int, token: str) -> None:
        self.fd = fd
        self.prefix = b"\0nkvm:" + token.encode() + b":"
        self.pending = b""
        self.broken = False  # the reader went away (EPIPE): keep reading, stop writing
        self.started = False
        self.status: int | None = None
        self.ended = False
        self.recent = b""  # the last bytes written through, for a caller looking for a line

    def feed(self, data: bytes) -> None:
        buf = self.pending + data
        while (i := buf.find(self.prefix)) >= 0:
            j = buf.find(b"\0", i + len(self.prefix))
            if j < 0:
                if len(buf) - i - len(self.prefix) <= MAX_EVENT:
                    self.write(buf[:i])
                    self.pending = buf[i:]
                    return
                break  # not a marker after all
            self.write(buf[:i])
            self.event(buf[i + len(self.prefix):j].decode("ascii", "replace"))
            buf = buf[j + 1:]
        keep = self.partial_prefix(buf)
        self.write(buf[:len(buf) - keep])
        self.pending = buf[len(buf) - keep:]

    def partial_prefix(self, buf: bytes) -> int:
        """Length of the longest tail of buf that is a proper start of the marker prefix."""
        for n in range(min(len(buf), len(self.prefix) - 1), 0, -1):
            if buf.endswith(self.prefix[:n]):
                return n
        return 0

    def event(self, what: str) -> None:
        if what == "start":
            self.started = True
        elif what == "end":
            self.ended = True
        elif what.startswith("exit="):
            self.status = int(what[len("exit="):])
            self.ended = True

    def flush(self) -> None:
        self.write(self.pending)
        self.pending = b""

    def write(self, data: bytes) -> None:
        self.recent = (self.recent + data)[-256:]
        view = memoryview(data)
        while view and not self.broken:
            try:
                n = os.write(self.fd, view)
            except BrokenPipeError:
                self.broken = True
            except BlockingIOError:
                os.set_blocking(self.fd, True)  # the caller handed us a non-blocking fd
            else:
                view = view[n:]
