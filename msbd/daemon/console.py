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
is plain blocking code; `read_following` runs it in a thread and long-polls
for a live run's next output).

A read costs at most `limit` bytes of memory and of I/O whatever the log's
size: pages from an offset are `pread`s, and a tail is found by reading
backwards from the end in blocks. Working on whole files in a thread is not
enough: splitting 16 MiB of short lines holds the GIL for most of a second,
which stalls the event loop just as surely.
"""

from __future__ import annotations

import codecs
import contextlib
import functools
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import anyio


@dataclass(frozen=True, slots=True)
class LogChunk:
    data: bytes
    offset: int  # stream offset just after `data`: pass it back to continue
    more: bool = False  # bytes after `offset` were already in the log: a page ended early


# A rotation (rename, new `.base`, new file) and a reader's opening of the pair of files
# exclude each other: a few syscalls each, so the writer (on the event loop) waits
# microseconds at most. Retrying a reader instead does not work: in a thread that
# spins, it keeps the GIL from the writer halfway through its rotation.
_TURN = threading.Lock()


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
        with _TURN:  # a reader sees the files and `base` from before or from after
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


# --- reading ---------------------------------------------------------------------------

_BLOCK = 64 * 1024  # a tail is read backwards in blocks of this size


class _Stream:
    """The log as one byte stream `[first, end)`: the rotated file, then the current one.

    Both files are opened together with the `base` that joins them, under
    `_TURN`, so the snapshot holds whatever the writer does next: a later
    rotation renames or unlinks names, not the open files, and bytes appended
    after `end` are left for the next call. Reads are `pread`s.
    """

    def __init__(self, path: Path) -> None:
        with _TURN:
            self.base = _read_base(path)
            self._current = _open(path)
            self._old = _open(path.with_name(path.name + ".1"))
        old_size = os.fstat(self._old).st_size if self._old is not None else 0
        self.first = self.base - old_size
        self.end = self.base + (os.fstat(self._current).st_size if self._current is not None
                                 else 0)

    def read(self, start: int, size: int) -> bytes:
        """Up to `size` bytes from stream offset `start` (>= `first`), within one file."""
        if start < self.base:
            fd, pos, size = self._old, start - self.first, min(size, self.base - start)
        else:
            fd, pos, size = self._current, start - self.base, min(size, self.end - start)
        if fd is None or size <= 0:
            return b""
        parts: list[bytes] = []
        while size > 0:
            part = os.pread(fd, size, pos)
            if not part:  # cannot happen to an append-only file; never loop on it
                break
            parts.append(part)
            pos += len(part)
            size -= len(part)
        return b"".join(parts)

    def close(self) -> None:
        _close(self._current, self._old)


def _open(path: Path) -> int | None:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None


def _close(*fds: int | None) -> None:
    for fd in fds:
        if fd is not None:
            os.close(fd)


def read_log(path: Path, *, offset: int | None, tail: int | None, limit: int) -> LogChunk:
    """Up to `limit` bytes from stream `offset`, or the last `tail` lines (blocking I/O).

    Memory and bytes read are bounded by `limit` whatever the size of the log:
    a tail is found by reading backwards from the end, never by reading the
    files whole.
    """
    stream = _Stream(path)
    try:
        if tail is not None:
            return LogChunk(_tail(stream, lines=tail, limit=limit), stream.end)
        start = max(offset or 0, stream.first)
        if start >= stream.end:
            return LogChunk(b"", stream.end)
        data = stream.read(start, limit)
        after = start + len(data)
        return LogChunk(data, after, more=after < stream.end)
    finally:
        stream.close()


def _tail(stream: _Stream, *, lines: int, limit: int) -> bytes:
    """The last `lines` lines (ending in `\\n`, the last one maybe not), cut to their last
    `limit` bytes, read backwards in blocks."""
    end = stream.end
    stop = max(stream.first, end - limit)  # nothing before this is ever returned
    blocks: list[bytes] = []
    hi, found = end, 0
    while lines and hi > stop:
        lo = max(stop, hi - _BLOCK, stream.base if hi > stream.base else stream.first)
        block = stream.read(lo, hi - lo)
        blocks.append(block)
        # A `\n` as the very last byte ends the last line: it does not start one.
        at = len(block) - 1 if hi == end and block.endswith(b"\n") else len(block)
        count = block.count(b"\n", 0, at)
        if found + count >= lines:
            blocks[-1] = block[_newline_back(block, lines - found, at) + 1:]
            break
        found += count
        hi = lo
    return b"".join(reversed(blocks))


def _newline_back(block: bytes, k: int, at: int) -> int:
    """Index of the `k`-th `\n` before `at`, counting back from `at` (there are >= k):
    a binary search on counts, so no per-line Python loop and no copies."""
    lo, hi = 0, at  # count(lo, at) >= k > count(hi, at)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if block.count(b"\n", mid, at) >= k:
            lo = mid
        else:
            hi = mid
    return lo


def text_page(chunk: LogChunk) -> tuple[str, int]:
    """A chunk as text, and the offset to continue from.

    Never splits a UTF-8 sequence: an incomplete tail is held back for the next
    call, unless a page ended inside the only character it has (a reader must
    move on).
    """
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    text = decoder.decode(chunk.data, final=False)
    held = len(decoder.getstate()[0])
    if held and not text and chunk.more:
        text, held = chunk.data.decode("utf-8", "replace"), 0
    return text, chunk.offset - held


async def read_following(path: Path, *, offset: int | None, tail: int | None, limit: int,
                         wait: float | None, output: anyio.Event | None) -> LogChunk:
    """`read_log` off the event loop; with nothing new to read yet, wait up to `wait`
    seconds for `output` (the run's next console output; None: the run ended) and read
    once more. A `tail` read never waits."""
    read = functools.partial(read_log, path, offset=offset, tail=tail, limit=limit)
    chunk = await anyio.to_thread.run_sync(read)
    if chunk.data or not wait or tail is not None or output is None:
        return chunk
    with anyio.move_on_after(wait):
        await output.wait()
    return await anyio.to_thread.run_sync(read)
