"""The worker's fd checks as a table: each function, each kind of fd, each message."""

from __future__ import annotations

import fcntl
import os
import socket
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from msbd.errors import FdCheckFailed
from msbd.vm import fds


class Opened:
    """Fds a case opened, closed after the test."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.fds: list[int] = []

    def keep(self, *fd: int) -> int:
        self.fds.extend(fd)
        return fd[0]


@pytest.fixture
def opened(tmp_path: Path) -> Iterator[Opened]:
    o = Opened(tmp_path)
    yield o
    for fd in o.fds:
        os.close(fd)


def pipe_read(o: Opened) -> int:
    r, w = os.pipe()
    os.set_inheritable(r, True)
    return o.keep(r, w)


def pipe_write(o: Opened) -> int:
    r, w = os.pipe()
    o.keep(r, w)
    os.set_inheritable(w, True)
    return w


def pipe_read_cloexec(o: Opened) -> int:
    r, w = os.pipe()  # Python's fds are close-on-exec by default
    return o.keep(r, w)


def regular(o: Opened) -> int:
    fd = os.open(o.tmp / "f", os.O_RDWR | os.O_CREAT, 0o600)
    os.set_inheritable(fd, True)
    return o.keep(fd)


def regular_write_only(o: Opened) -> int:
    return o.keep(os.open(o.tmp / "w", os.O_WRONLY | os.O_CREAT, 0o600))


def memfd(o: Opened) -> int:
    return o.keep(os.memfd_create("spec", 0))


def sock(o: Opened) -> int:
    a, b = socket.socketpair()
    b.close()
    return o.keep(a.detach())


def chardev(o: Opened) -> int:
    return o.keep(os.open(os.devnull, os.O_RDWR))


def directory(o: Opened) -> int:
    return o.keep(os.open(o.tmp, os.O_RDONLY | os.O_DIRECTORY))


def closed(o: Opened) -> int:
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    return r


Check = Callable[[int], None]


def watchdog(fd: int) -> None:
    fds.check_watchdog_fd(fd, expected=fd)


CASES: list[tuple[str, Check, Callable[[Opened], int], str | None]] = [
    ("97 pipe read end", watchdog, pipe_read, None),
    ("97 pipe write end", watchdog, pipe_write,
     "not readable (the write end of the watchdog pipe?)"),
    ("97 close-on-exec", watchdog, pipe_read_cloexec,
     "close-on-exec is set (the watchdog pipe must be inherited)"),
    ("97 regular file", watchdog, regular, "not a FIFO (a regular file)"),
    ("97 socket", watchdog, sock, "not a FIFO (a socket)"),
    ("97 char device", watchdog, chardev, "not a FIFO (a character device)"),
    ("97 directory", watchdog, directory, "not a FIFO (a directory)"),
    ("97 closed", watchdog, closed, "not open"),
    ("98 pipe write end", fds.check_status_fd, pipe_write, None),
    ("98 pipe read end", fds.check_status_fd, pipe_read, "not writable (opened read-only)"),
    ("98 regular file", fds.check_status_fd, regular, "not a FIFO (a regular file)"),
    ("98 socket", fds.check_status_fd, sock, "not a FIFO (a socket)"),
    ("98 closed", fds.check_status_fd, closed, "not open"),
    ("96 memfd", fds.check_spec_fd, memfd, None),
    ("96 pipe read end", fds.check_spec_fd, pipe_read, None),
    ("96 regular file", fds.check_spec_fd, regular, None),
    ("96 pipe write end", fds.check_spec_fd, pipe_write, "not readable (opened write-only)"),
    ("96 write-only file", fds.check_spec_fd, regular_write_only,
     "not readable (opened write-only)"),
    ("96 socket", fds.check_spec_fd, sock, "not a regular file or pipe (a socket)"),
    ("96 char device", fds.check_spec_fd, chardev,
     "not a regular file or pipe (a character device)"),
    ("96 directory", fds.check_spec_fd, directory, "not a regular file or pipe (a directory)"),
    ("96 closed", fds.check_spec_fd, closed, "not open"),
]


@pytest.mark.parametrize(("check", "make", "problem"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_fd_check(opened: Opened, check: Check, make: Callable[[Opened], int],
                  problem: str | None) -> None:
    fd = make(opened)
    if problem is None:
        check(fd)
        return
    with pytest.raises(FdCheckFailed) as info:
        check(fd)
    assert info.value.fd == fd
    assert info.value.problem == problem
    assert str(info.value) == f"fd {fd}: {problem}"


def test_watchdog_must_be_fd_97_exactly(opened: Opened) -> None:
    fd = pipe_read(opened)
    assert fd != fds.WATCHDOG_FD
    with pytest.raises(FdCheckFailed) as info:
        fds.check_watchdog_fd(fd)
    assert str(info.value) == f"fd {fd}: the watchdog pipe must be fd 97"


@pytest.mark.parametrize(("mode", "name"), [
    (stat.S_IFREG, "a regular file"), (stat.S_IFIFO, "a FIFO"), (stat.S_IFSOCK, "a socket"),
    (stat.S_IFCHR, "a character device"), (stat.S_IFBLK, "a block device"),
    (stat.S_IFDIR, "a directory"), (stat.S_IFLNK, "a symbolic link"),
    (0, "an unknown kind of file"),
])
def test_kind_names_every_file_type(mode: int, name: str) -> None:
    assert fds.kind(mode | 0o644) == name


def test_set_cloexec(opened: Opened) -> None:
    fd = pipe_read(opened)
    fds.set_cloexec(fd)
    assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
