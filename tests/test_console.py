"""Console logs: a size cap, one rotated file, and stream offsets that survive rotation."""

from __future__ import annotations

from pathlib import Path

from msbd.daemon.console import ConsoleLog, log_path, read_log, remove_log


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
