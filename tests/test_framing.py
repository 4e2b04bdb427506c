"""Newline framing, pure: chunks in, frames out, the limit on a whole or a growing frame;
and the worker status pipe's line reader built on it."""

from __future__ import annotations

import pytest

from msbd.daemon.pipes import LineSplitter
from msbd.rpc.framing import Framer, FrameTooLong


def frames_of(framer: Framer) -> list[bytes]:
    out = []
    while (frame := framer.pop()) is not None:
        out.append(frame)
    return out


@pytest.mark.parametrize(("chunks", "frames", "rest"), [
    ([b"a\nb\n"], [b"a", b"b"], 0),
    ([b"a", b"b\n", b"c"], [b"ab"], 1),
    ([b"\n\n", b"x\n\n"], [b"x"], 0),  # empty frames are skipped
    ([b" \r\n"], [b" \r"], 0),  # blank ones are not: the reader decides
    ([b"ab", b"", b"c\nd"], [b"abc"], 1),
])
def test_chunks_to_frames(chunks: list[bytes], frames: list[bytes], rest: int) -> None:
    framer = Framer()
    got = []
    for chunk in chunks:
        framer.feed(chunk)
        got += frames_of(framer)
    assert got == frames and framer.pending == rest


def test_every_split_of_a_stream_gives_the_same_frames() -> None:
    data = b'{"a": 1}\n\n{"b": [2, 3]}\nxyz\n'
    for cut in range(len(data) + 1):
        framer = Framer(max_frame=20)
        framer.feed(data[:cut])
        got = frames_of(framer)
        framer.feed(data[cut:])
        assert got + frames_of(framer) == [b'{"a": 1}', b'{"b": [2, 3]}', b"xyz"]


@pytest.mark.parametrize("data", [b"x" * 11 + b"\n", b"ok\n" + b"x" * 11])
def test_a_frame_over_the_limit_raises_whole_or_growing(data: bytes) -> None:
    framer = Framer(max_frame=10)
    framer.feed(data)
    with pytest.raises(FrameTooLong) as info:
        frames_of(framer)
    assert info.value.limit == 10 and info.value.code == -32600
    assert info.value.data == {"limit": 10}


def test_a_frame_at_the_limit_passes() -> None:
    framer = Framer(max_frame=10)
    framer.feed(b"x" * 10)
    assert framer.pop() is None and framer.unfinished()
    framer.feed(b"\n")
    assert framer.pop() == b"x" * 10


def test_unfinished_and_has_frame() -> None:
    framer = Framer(max_frame=4)
    assert not framer.unfinished() and not framer.has_frame()
    framer.feed(b"ab\ncd")
    assert framer.has_frame() and not framer.unfinished()  # a whole frame comes first
    assert framer.pop() == b"ab"
    assert not framer.has_frame() and framer.unfinished()
    framer.feed(b"efg")  # not popped: `unfinished` checks the limit itself
    with pytest.raises(FrameTooLong):
        framer.unfinished()


def test_finish_completes_a_last_frame_without_its_newline() -> None:
    framer = Framer()
    framer.feed(b"a\nb")
    assert framer.pop() == b"a"
    assert framer.finish() and framer.pop() == b"b"
    assert not framer.finish() and framer.pop() is None and framer.pending == 0


def test_discard_drops_everything() -> None:
    framer = Framer()
    framer.feed(b"a\nbc")
    framer.discard()
    assert framer.pending == 0 and framer.pop() is None
    framer.feed(b"d\n")
    assert framer.pop() == b"d"


def test_line_splitter_drops_a_line_that_grows_over_its_limit() -> None:
    lines: list[str] = []
    splitter = LineSplitter(lines.append, limit=8)
    splitter.feed(b"heartbeat\nent")
    splitter.feed(b"ering\nerror " + b"x" * 20)  # over the limit unfinished: dropped
    splitter.feed(b"yy\nheartbeat \r\n")  # what follows the cut ends a line of its own
    assert lines == ["heartbeat", "entering", "yy", "heartbeat"]


def lines_through_the_framer(chunks: list[bytes], limit: int) -> list[str]:
    """What LineSplitter gives when every chunk goes through the framer."""
    out: list[str] = []
    framer = Framer()
    for chunk in chunks:
        framer.feed(chunk)
        out.extend(frame.decode(errors="replace").strip() for frame in frames_of(framer))
        if framer.pending > limit:
            framer.discard()
    return out


@pytest.mark.parametrize("chunks", [
    [b"heartbeat\n", b"heartbeat\n", b"\n", b" \n", b"error x\n"],  # one whole line each
    [b"heart", b"beat\n", b"heartbeat\n"],  # a line split, then a whole one after it
    [b"a\nb\n", b"c\n", b"", b"d", b"\n"],  # several lines in a chunk, an empty chunk
    [b"x" * 20 + b"\n", b"y" * 20, b"z\n", b"w\n"],  # a whole line over the limit; a cut
])
def test_line_splitter_shortcut_gives_the_framers_lines(chunks: list[bytes]) -> None:
    """A chunk that is exactly one whole line, with nothing buffered, takes a shortcut
    past the framer; the lines are the framer's all the same."""
    lines: list[str] = []
    splitter = LineSplitter(lines.append, limit=8)
    for chunk in chunks:
        splitter.feed(chunk)
    assert lines == lines_through_the_framer(chunks, 8)
    assert lines


@pytest.mark.parametrize(("buffered", "chunk", "limit", "want"), [
    (b"", b"heartbeat\n", None, b"heartbeat"),
    (b"", b"\n", None, b""),
    (b"", b"", None, None),
    (b"", b"a\nb\n", None, None),  # two lines: fed as usual
    (b"", b"heart", None, None),  # no newline yet
    (b"he", b"artbeat\n", None, None),  # something buffered: it comes first
    (b"", b"x" * 9 + b"\n", 8, None),  # over the limit: fed, so pop raises
    (b"", b"x" * 8 + b"\n", 8, b"x" * 8),
])
def test_single_takes_only_a_lone_whole_line(buffered: bytes, chunk: bytes,
                                              limit: int | None, want: bytes | None) -> None:
    framer = Framer(limit)
    framer.feed(buffered)
    assert framer.single(chunk) == want
    assert framer.pending == len(buffered)  # left as it was either way
