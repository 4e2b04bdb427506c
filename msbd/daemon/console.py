"""Per-sandbox console logs: a size-capped file plus one rotated file, read by offset.

Logs are named by the sandbox's immutable id (`<id>.log`), never by its
name: ids are never reused, so a new sandbox never sees an old one's output,
whatever name it takes. The log goes with the record (`sandbox.remove`), and
at startup every log that belongs to no record is deleted (`remove_orphans`:
a crash between the two, or a database replaced by another).

Offsets are positions in the sandbox's whole console stream since the log was
created, so a follower's offset stays valid across rotation: `<id>.log`
holds bytes from `base` on, `<id>.log.1` the bytes just before `base`, and
`<id>.log.base` remembers `base` across daemon restarts. Writes are small
appends done inline (page cache); reads run in a worker thread (`read_log`
is plain blocking code, the caller decides where it runs).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class LogChunk:
    data: bytes
    offset: int  # stream offset just after `data`: pass it back to continue


_SUFFIXES = ("", ".1", ".base", ".base.tmp")


def log_path(log_dir: Path, sandbox_id: int) -> Path:
    return log_dir / f"{int(sandbox_id)}.log"


def remove_orphans(log_dir: Path, ids: set[int]) -> int:
    """Delete every file in `log_dir` that is not the log of one of `ids`; how many went.

    Files named otherwise (logs named by sandbox name, from before ids) go too.
    """
    keep = {log_path(log_dir, i).name + suffix for i in ids for suffix in _SUFFIXES}
    removed = 0
    try:
        entries = list(os.scandir(log_dir))
    except FileNotFoundError:
        return 0
    for entry in entries:
        if entry.name not in keep and entry.is_file(follow_symlinks=False):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed += 1
    return removed


def _read_base(path: Path) -> int:
    try:
        return int(path.with_name(path.name + ".base").read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


class ConsoleLog:
    """The writing side, owned by the sandbox's watcher while a run is live."""

    def __init__(self, path: Path, *, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._size = os.fstat(self._fd).st_size
        self.base = _read_base(path)

    @property
    def end(self) -> int:
        return self.base + self._size

    def write(self, data: bytes) -> None:
        if self._size + len(data) > self.max_bytes and self._size > 0:
            self._rotate()
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
            self._size += n

    def _rotate(self) -> None:
        os.close(self._fd)
        os.replace(self.path, self.path.with_name(self.path.name + ".1"))
        self.base += self._size
        tmp = self.path.with_name(self.path.name + ".base.tmp")
        tmp.write_text(f"{self.base}\n")
        os.replace(tmp, self.path.with_name(self.path.name + ".base"))
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                           0o600)
        self._size = 0

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)


def remove_log(path: Path) -> None:
    for suffix in _SUFFIXES:
        with contextlib.suppress(FileNotFoundError):
            path.with_name(path.name + suffix).unlink()


def read_log(path: Path, *, offset: int | None, tail: int | None, limit: int) -> LogChunk:
    """Up to `limit` bytes from stream `offset`, or the last `tail` lines (blocking I/O)."""
    base = _read_base(path)
    old = path.with_name(path.name + ".1")
    try:
        current = path.read_bytes() if tail is not None else None
    except FileNotFoundError:
        current = b""
    if tail is not None:
        assert current is not None
        try:
            previous = old.read_bytes()
        except FileNotFoundError:
            previous = b""
        data = previous + current
        end = base + len(current)
        lines = data.splitlines(keepends=True)
        picked = b"".join(lines[-tail:]) if tail else b""
        return LogChunk(picked[-limit:], end)
    start = offset or 0
    size = path.stat().st_size if path.exists() else 0
    end = base + size
    if start >= end:
        return LogChunk(b"", end)
    if start < base:
        try:
            old_size = old.stat().st_size
        except FileNotFoundError:
            old_size = 0
        first = base - old_size
        start = max(start, first)
        if start < base:
            with open(old, "rb") as f:
                f.seek(start - first)
                data = f.read(min(limit, base - start))
            return LogChunk(data, start + len(data))
    with open(path, "rb") as f:
        f.seek(start - base)
        data = f.read(limit)
    return LogChunk(data, start + len(data))
