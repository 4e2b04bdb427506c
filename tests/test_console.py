"""Console logs: a size cap, one rotated file, stream offsets that survive rotation, and
reads whose cost is bounded by the page asked for."""

from __future__ import annotations

import re
import tempfile
import threading
import tracemalloc
from collections.abc import Callable
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from msbd.daemon.console import ConsoleLog, LogChunk, log_path, read_log, remove_log


def test_rotation_keeps_one_old_file_and_offsets_stay_valid(tmp_path: Path) -> None:
    path = log_path(tmp_path / "logs", 1)
    log = ConsoleLog(path, max_bytes=10)
    log.write(b"0123456789")  # exactly the cap: no rotation yet
    assert not path.with_name("1.log.1").exists()
    log.write(b"abcdef")  # over the cap: rotate first
    assert path.with_name("1.log.1").read_bytes() == b"0123456789"
    assert path.read_bytes() == b"abcdef"
    assert log.end == 16
    # A reader at any stream offset gets the bytes that were there.
    assert read_log(path, offset=0, tail=None, limit=100).data == b"0123456789"
    chunk = read_log(path, offset=4, tail=None, limit=3)
    assert (chunk.data, chunk.offset) == (b"456", 7)
    chunk = read_log(path, offset=10, tail=None, limit=100)
    assert (chunk.data, chunk.offset) == (b"abcdef", 16)
    assert read_log(path, offset=16, tail=None, limit=100).data == b""
    # A second rotation drops the oldest bytes; offsets keep counting.
    log.write(b"ghijklmn")
    assert log.end == 24
    assert read_log(path, offset=0, tail=None, limit=100).data == b"abcdef"  # oldest left
    chunk = read_log(path, offset=16, tail=None, limit=100)
    assert (chunk.data, chunk.offset) == (b"ghijklmn", 24)
    log.close()
    # The offset base survives a restart of the daemon (a new ConsoleLog).
    again = ConsoleLog(path, max_bytes=10)
    assert again.end == 24
    again.close()


def test_tail_spans_the_rotated_file(tmp_path: Path) -> None:
    path = log_path(tmp_path, 2)
    log = ConsoleLog(path, max_bytes=12)
    for line in (b"one\n", b"two\n", b"three\n", b"four\n"):
        log.write(line)
    log.close()
    assert read_log(path, offset=None, tail=3, limit=1000).data == b"two\nthree\nfour\n"
    assert read_log(path, offset=None, tail=0, limit=1000).data == b""


def test_remove_log_removes_every_piece(tmp_path: Path) -> None:
    path = log_path(tmp_path, 3)
    log = ConsoleLog(path, max_bytes=4)
    log.write(b"12345")
    log.write(b"678")
    log.close()
    remove_log(path)
    assert list(tmp_path.iterdir()) == []


# --- tails and pages cost O(limit), whatever the size of the log ---------------------------

MiB = 1024 * 1024
LINE = re.compile(rb"[^\n]*\n|[^\n]+$")


def reference_tail(stream: bytes, lines: int, limit: int) -> bytes:
    """What a tail means, the slow way: lines end in `\\n` (the last one may not)."""
    picked = b"".join(LINE.findall(stream)[-lines:]) if lines else b""
    return picked[-limit:]


def kept(path: Path) -> bytes:
    old = path.with_name(path.name + ".1")
    return (old.read_bytes() if old.exists() else b"") + path.read_bytes()


def read_cost(fn: Callable[[], LogChunk]) -> tuple[LogChunk, int, int]:
    """(result, peak bytes allocated, bytes read by read(2)/pread(2)) of one call."""
    def rchar() -> int:
        io = Path("/proc/self/io").read_text()
        return int(re.search(r"^rchar: (\d+)$", io, re.M).group(1))  # type: ignore[union-attr]

    tracemalloc.start()
    try:
        before = rchar()
        result = fn()
        read = rchar() - before
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return result, peak, read


def short_lines(first: int, size: int) -> bytes:
    """Numbered lines of a few bytes each, `size` bytes in all (the last one cut)."""
    out = b"".join(b"%d\n" % i for i in range(first, first + size // 3))
    return out[:size]


def test_a_tail_of_a_full_log_of_short_lines_costs_o_limit(tmp_path: Path) -> None:
    """The default `log_max_bytes` (8 MiB) of short lines plus the rotated 8 MiB: what a
    chatty sandbox leaves. A tail reads and holds about `limit` bytes, not 16 MiB."""
    path = log_path(tmp_path, 11)
    log = ConsoleLog(path, max_bytes=8 * MiB)
    for part in range(16):  # rotates once, at 8 MiB; both files end up full
        log.write(short_lines(part * 400_000, MiB - 8 * (part == 15)))
    log.write(b"the end\n")
    log.close()
    assert path.with_name("11.log.1").stat().st_size == 8 * MiB
    assert path.stat().st_size == 8 * MiB
    stream = kept(path)
    limit = 256 * 1024  # the API's default page
    for lines in (10, 1_000_000):  # a few lines; more lines than `limit` bytes hold
        chunk, peak, read = read_cost(lambda n=lines: read_log(  # type: ignore[misc]
            path, offset=None, tail=n, limit=limit))
        assert read <= limit + 4096, f"tail {lines}: read {read} bytes"
        assert peak <= 3 * limit, f"tail {lines}: {peak} bytes allocated at the peak"
        assert chunk.data == reference_tail(stream, lines, limit)
        assert chunk.offset == 16 * MiB and not chunk.more
    # A page from an offset costs its page, whichever file it comes from.
    for offset in (0, 12 * MiB):
        chunk, peak, read = read_cost(lambda o=offset: read_log(  # type: ignore[misc]
            path, offset=o, tail=None, limit=limit))
        assert read <= limit + 4096 and peak <= 3 * limit
        assert chunk.data == stream[offset:offset + limit] and chunk.more


def test_tails_across_blocks_and_the_rotated_file(tmp_path: Path) -> None:
    """Lines of every length up to a few blocks, split across the rotated and the current
    file: every tail is what `reference_tail` says, cut or not by `limit`."""
    path = log_path(tmp_path, 12)
    log = ConsoleLog(path, max_bytes=300_000)
    lengths = [1, 0, 70_000, 5, 150_000, 2, 0, 0, 65_535, 65_536, 9, 200_000, 3, 1]
    for i, n in enumerate(lengths * 2):
        log.write(bytes([97 + i % 26]) * n + b"\n")
    log.write(b"no newline at the end")
    log.close()
    stream = kept(path)
    assert path.with_name("12.log.1").exists() and len(stream) > 300_000
    for lines in (0, 1, 2, 3, 5, 9, 14, 20, 1000):
        for limit in (1, 10, 65_536, 100_000, 4 * MiB):
            chunk = read_log(path, offset=None, tail=lines, limit=limit)
            assert chunk.data == reference_tail(stream, lines, limit), (lines, limit)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=12).map(lambda b: b.replace(b"\r", b"")), max_size=30),
       st.integers(1, 40), st.integers(0, 12), st.integers(1, 50), st.integers(0, 400))
def test_tails_and_pages_match_the_stream(writes: list[bytes], cap: int, lines: int,
                                         limit: int, offset: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = log_path(Path(tmp), 13)
        log = ConsoleLog(path, max_bytes=cap)
        for data in writes:
            log.write(data)
        log.close()
        stream, end = kept(path), log.end
        first = end - len(stream)
        chunk = read_log(path, offset=None, tail=lines, limit=limit)
        assert (chunk.data, chunk.offset, chunk.more) == (
            reference_tail(stream, lines, limit), end, False)
        # Pages from `offset` (moved up to the oldest byte kept) up to a file's end.
        chunk = read_log(path, offset=offset, tail=None, limit=limit)
        start = min(max(offset, first), end)
        assert chunk.data == stream[start - first:][:len(chunk.data)]
        assert chunk.offset == start + len(chunk.data) and chunk.more == (chunk.offset < end)
        assert chunk.data or start == end


def test_reads_while_the_writer_rotates(tmp_path: Path) -> None:
    """A reader racing a writer that rotates every few writes: every page and tail is
    the stream's own bytes at the offsets it names (never the old file taken for the new,
    or one file read twice)."""
    record = 9  # b"%08d\n": the byte at stream offset X is known from X alone
    path = log_path(tmp_path, 14)
    log = ConsoleLog(path, max_bytes=record * 7)
    done = threading.Event()

    def write() -> None:
        i = 0
        while not done.is_set():
            log.write(b"%08d\n" % i)
            i += 1

    def expected(start: int, size: int) -> bytes:
        first, last = start // record, (start + size) // record + 1
        text = b"".join(b"%08d\n" % i for i in range(first, last))
        return text[start - first * record:][:size]

    writer = threading.Thread(target=write)
    writer.start()
    try:
        for i in range(3000):
            chunk = read_log(path, offset=None, tail=2, limit=100)
            assert chunk.data == expected(chunk.offset - len(chunk.data), len(chunk.data))
            assert len(chunk.data) == min(2 * record, chunk.offset), chunk  # 2 lines, once there
            offset = max(0, chunk.offset - (i % 100))
            page = read_log(path, offset=offset, tail=None, limit=30)
            start = page.offset - len(page.data)
            assert page.data == expected(start, len(page.data)), (offset, page)
    finally:
        done.set()
        writer.join()
        log.close()
