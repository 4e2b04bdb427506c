"""The worker's inherited file descriptors: what each must be, and closing the rest."""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from collections.abc import Iterable
from typing import Final

from msbd.contract import SPEC_FD, STATUS_FD, STDIO_FDS, WATCHDOG_FD
from msbd.errors import FdCheckFailed

# The fd numbers are the contract's; the worker reads them here, next to their checks.
__all__ = ["SPEC_FD", "STATUS_FD", "STDIO_FDS", "WATCHDOG_FD", "check_spec_fd",
           "check_status_fd", "check_watchdog_fd", "close_other_fds", "kind", "set_cloexec"]

_KINDS: Final = (
    (stat.S_ISREG, "a regular file"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISLNK, "a symbolic link"),
)


def kind(mode: int) -> str:
    """What sort of file `mode` (an `st_mode`) says, for a message: "a socket"."""
    for test, name in _KINDS:
        if test(mode):
            return name
    return "an unknown kind of file"


def _fd_flags(fd: int) -> int:
    try:
        return fcntl.fcntl(fd, fcntl.F_GETFD)
    except OSError as exc:
        if exc.errno == errno.EBADF:
            raise FdCheckFailed(fd, "not open") from None
        raise FdCheckFailed(fd, f"cannot inspect it ({os.strerror(exc.errno or 0)})") from None


def _mode(fd: int) -> int:
    try:
        return os.fstat(fd).st_mode
    except OSError as exc:
        raise FdCheckFailed(fd, f"cannot stat it ({os.strerror(exc.errno or 0)})") from None


def _access_mode(fd: int) -> int:
    return fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE


def check_watchdog_fd(fd: int, expected: int = WATCHDOG_FD) -> None:
    """fd 97: exactly that number, open, a FIFO, readable, and not close-on-exec.

    Readable is stricter than msb's check: a write end there would never see
    EOF, so the worker would silently outlive its daemon.
    """
    if fd != expected:
        raise FdCheckFailed(fd, f"the watchdog pipe must be fd {expected}")
    flags = _fd_flags(fd)
    mode = _mode(fd)
    if not stat.S_ISFIFO(mode):
        raise FdCheckFailed(fd, f"not a FIFO ({kind(mode)})")
    if _access_mode(fd) not in (os.O_RDONLY, os.O_RDWR):
        raise FdCheckFailed(fd, "not readable (the write end of the watchdog pipe?)")
    if flags & fcntl.FD_CLOEXEC:
        raise FdCheckFailed(fd, "close-on-exec is set (the watchdog pipe must be inherited)")


def check_status_fd(fd: int) -> None:
    """fd 98: open, a FIFO, opened for writing."""
    _fd_flags(fd)
    mode = _mode(fd)
    if not stat.S_ISFIFO(mode):
        raise FdCheckFailed(fd, f"not a FIFO ({kind(mode)})")
    if _access_mode(fd) not in (os.O_WRONLY, os.O_RDWR):
        raise FdCheckFailed(fd, "not writable (opened read-only)")


def check_spec_fd(fd: int) -> None:
    """fd 96: open, a regular file (a memfd is one) or a pipe, opened for reading."""
    _fd_flags(fd)
    mode = _mode(fd)
    if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode)):
        raise FdCheckFailed(fd, f"not a regular file or pipe ({kind(mode)})")
    if _access_mode(fd) not in (os.O_RDONLY, os.O_RDWR):
        raise FdCheckFailed(fd, "not readable (opened write-only)")


def close_other_fds(keep: Iterable[int]) -> list[int]:
    """Close every fd not in `keep`, so nothing of the daemon reaches a guest.

    Returns the fds that were open and got closed (as far as /proc shows), so
    the worker can say that its parent leaked them.
    """
    keep = set(keep)
    try:
        leaked = sorted(fd for fd in map(int, os.listdir("/proc/self/fd")) if fd not in keep)
    except OSError:
        leaked = []
    leaked = [fd for fd in leaked if _is_open(fd)]  # drops listdir's own, now closed, fd
    low = 0
    for fd in sorted(set(keep)):
        if fd > low:
            os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 2**31 - 1)
    return leaked


def _is_open(fd: int) -> bool:
    try:
        fcntl.fcntl(fd, fcntl.F_GETFD)
    except OSError:
        return False
    return True


def set_cloexec(fd: int) -> None:
    """Keep a checked fd from any process libkrun might start."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFD)
    fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
