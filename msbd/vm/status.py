"""What the worker tells the daemon: status-pipe lines (fd 98) and stderr lines."""

from __future__ import annotations

import contextlib
import os
from typing import Final

from msbd.contract import StatusWord, status_line

ENTERING: Final = status_line(StatusWord.ENTERING)
HEARTBEAT: Final = status_line(StatusWord.HEARTBEAT)
# One write of at most PIPE_BUF bytes is atomic: lines never interleave.
_MAX_LINE: Final = 4000


def one_line(text: str) -> str:
    """`text` with line breaks turned into spaces, for a one-line message."""
    return " ".join(text.splitlines()) if text else text


def say(message: str) -> None:
    """One `msbd-worker: ...` line on stderr (the console pipe, so the sandbox's log)."""
    with contextlib.suppress(OSError):  # stderr gone too: the exit status still says it
        os.write(2, f"msbd-worker: {one_line(message)}\n".encode(errors="replace"))


def error_line(message: str) -> bytes:
    body = one_line(message).encode("utf-8", errors="replace")[:_MAX_LINE]
    return status_line(StatusWord.ERROR, body)


class StatusPipe:
    """The write end of the status pipe; a line that cannot be written is dropped."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def send(self, line: bytes) -> bool:
        """Write one line; False if the reader is gone (EPIPE) or the pipe is unusable."""
        try:
            os.write(self.fd, line)
        except BlockingIOError:
            return True  # a full pipe: the daemon is slow, not gone; this line is lost
        except OSError:
            return False
        return True
