"""Newline framing: a byte stream in, whole frames out. Pure: no I/O, no event loop.

Every msbd stream is newline-delimited: the control socket in both
directions (JSON never holds a raw newline), and the worker's status pipe.
`Framer` keeps one buffer per stream. `feed` appends what was read; `pop`
returns the next whole frame without its newline, skipping empty ones, or
None until the rest arrives. A frame over `max_frame` bytes raises
`FrameTooLong`, as soon as it is known: a frame still growing is checked
too, so a client cannot make the buffer grow without bound.

Scanning is incremental: bytes already searched for a newline are not
searched again when more arrive, so a large frame read in many small
chunks costs linear time. Consumed bytes are dropped from the front of the
buffer when the next chunk comes or the buffer runs dry.
"""

from __future__ import annotations

from msbd.errors import InvalidRequest


class FrameTooLong(InvalidRequest):
    """A frame is over the limit: the stream cannot be trusted past it."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"frame is over the limit of {limit} bytes; closing the connection",
                         data={"limit": limit})
        self.limit = limit


class Framer:
    """Splits one byte stream into frames; `max_frame` (bytes, None: no limit) bounds each."""

    __slots__ = ("_buf", "_max", "_pos", "_scan")

    def __init__(self, max_frame: int | None = None) -> None:
        self._buf = bytearray()
        self._max = max_frame
        self._pos = 0  # where the next frame starts
        self._scan = 0  # no newline in _buf[_pos:_scan]

    def feed(self, data: bytes) -> None:
        """Append bytes read from the stream."""
        self._compact()
        self._buf += data

    def pop(self) -> bytes | None:
        """The next whole frame (without its newline), or None until one is complete.

        Raises `FrameTooLong` for a whole or unfinished frame over the limit.
        """
        buf, limit = self._buf, self._max
        while True:
            nl = buf.find(b"\n", self._scan)
            if nl < 0:
                self._scan = len(buf)
                if limit is not None and len(buf) - self._pos > limit:
                    raise FrameTooLong(limit)
                self._compact()
                return None
            start = self._pos
            self._pos = self._scan = nl + 1
            if limit is not None and nl - start > limit:
                raise FrameTooLong(limit)
            if nl > start:
                return bytes(buf[start:nl])

    def single(self, chunk: bytes) -> bytes | None:
        """`chunk` without its newline if nothing is buffered and `chunk` is exactly one
        whole line within the limit, leaving the framer as it was (b"" for an empty
        line, which `pop` skips); else None, and the caller `feed`s it. A shortcut for
        streams whose every read is one line (a worker's heartbeats)."""
        end = len(chunk) - 1
        if (end < 0 or self._pos != len(self._buf) or chunk.find(b"\n") != end
                or (self._max is not None and end > self._max)):
            return None
        return chunk[:end]

    def unfinished(self) -> bool:
        """Whether the stream stops inside a frame, with no whole frame before it.

        Raises `FrameTooLong` when that frame is over the limit already.
        """
        buf, limit = self._buf, self._max
        if len(buf) == self._pos or buf.find(b"\n", self._scan) >= 0:
            return False
        self._scan = len(buf)
        if limit is not None and len(buf) - self._pos > limit:
            raise FrameTooLong(limit)
        return True

    def has_frame(self) -> bool:
        """Whether a whole frame (or an empty line) is waiting to be popped."""
        return self._buf.find(b"\n", self._scan) >= 0

    @property
    def pending(self) -> int:
        """Bytes buffered and not popped yet."""
        return len(self._buf) - self._pos

    def finish(self) -> bool:
        """End of stream: a last frame without its newline counts as whole (returns True)."""
        if self.pending and not self._buf.endswith(b"\n"):
            self._buf += b"\n"
            return True
        return False

    def discard(self) -> None:
        """Drop everything buffered (a reader that skips what it cannot keep)."""
        self._buf.clear()
        self._pos = self._scan = 0

    def _compact(self) -> None:
        if self._pos:
            del self._buf[:self._pos]
            self._scan -= self._pos
            self._pos = 0
