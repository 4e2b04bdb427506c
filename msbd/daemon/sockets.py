"""The control socket and the state-dir lock: created safely, never stolen.

A socket file left by a dead daemon is replaced; one a live daemon answers on
is never touched. The new socket is bound under a temporary name, given its
mode and group, then renamed into place, so no client ever sees it with the
wrong permissions. The state dir is guarded by an `flock`ed file for the
daemon's lifetime, so two daemons can never share one database.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import grp
import logging
import os
import socket
import stat
from pathlib import Path

from msbd.errors import AlreadyRunning, ConfigError
from msbd.peer import peer_pid

log = logging.getLogger("msbd.daemon")


def lock_state_dir(state_dir: Path) -> int:
    """Create the state dir (0700) and hold an exclusive lock on it; returns the lock fd.

    A state dir msbd cannot write (a read-only mount, a directory of mode 0500)
    is a `ConfigError` naming the path: startup's one-line message, not a traceback.
    """
    try:
        return _lock_state_dir(state_dir)
    except OSError as exc:
        raise ConfigError(f"cannot use the state directory {state_dir}: "
                          f"{_os_problem(exc, state_dir)}") from exc


def _os_problem(exc: OSError, path: Path) -> str:
    """`exc` in a few words, with the file it names when that is not `path`."""
    where = "" if exc.filename in (None, str(path)) else f"{exc.filename}: "
    return f"{where}{exc.strerror or exc}"


def _lock_state_dir(state_dir: Path) -> int:
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = state_dir.stat()
    if st.st_uid != os.getuid():
        raise ConfigError(f"state directory {state_dir} belongs to uid {st.st_uid}, not to "
                          f"msbd's uid {os.getuid()}; refusing to use it")
    if st.st_mode & 0o077:
        # The database holds launch specs, env secrets included: owner only.
        os.chmod(state_dir, 0o700)
    fd = os.open(state_dir / "msbd.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_pid(fd)
        os.close(fd)
        raise AlreadyRunning(f"another msbd{f' (pid {holder})' if holder else ''} is using the "
                             f"state directory {state_dir}") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _read_pid(fd: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(os.pread(fd, 32, 0).decode().strip() or "0") or None
    return None


def bind_control_socket(path: Path, *, mode: int = 0o660, group: str | None = None,
                        backlog: int = 1024) -> socket.socket:
    """A listening AF_UNIX socket at `path`, replacing a stale one, refusing a live one;
    a path msbd cannot bind (say, in a read-only directory) is a `ConfigError`."""
    try:
        return _bind_control_socket(path, mode=mode, group=group, backlog=backlog)
    except OSError as exc:
        raise ConfigError(f"cannot create the control socket {path}: "
                          f"{_os_problem(exc, path)}") from exc


def _bind_control_socket(path: Path, *, mode: int, group: str | None,
                         backlog: int) -> socket.socket:
    gid = _resolve_group(group)
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    _refuse_live_socket(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(str(tmp))
        os.chmod(tmp, mode)
        if gid is not None:
            os.chown(tmp, -1, gid)
        sock.listen(backlog)
        # A second check just before the rename narrows the window in which a
        # daemon started at the same moment could be replaced; the state-dir
        # lock is what really excludes it.
        _refuse_live_socket(path)
        os.rename(tmp, path)
    except BaseException:
        sock.close()
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return sock


def _resolve_group(group: str | None) -> int | None:
    if group is None:
        return None
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(f"socket_group {group!r} is not a group on this host") from None


def _refuse_live_socket(path: Path) -> None:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.settimeout(2.0)
        probe.connect(str(path))
    except ConnectionRefusedError:
        log.info("replacing stale socket %s (no daemon answers on it)", path)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return
    except OSError as exc:
        if exc.errno in (errno.ENOENT,):
            return
        raise ConfigError(f"cannot probe existing socket {path}: {exc.strerror}") from exc
    else:
        pid = peer_pid(probe)
        raise AlreadyRunning(f"another msbd (pid {pid}) is serving {path}; "
                             "stop it first or choose another --socket")
    finally:
        probe.close()
