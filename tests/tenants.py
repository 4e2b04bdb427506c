"""Test users, and clients that act as them: forked children that drop to a uid.

Clients of other uids are forked children of the test process that drop to
that uid (setgroups, setresgid, setresuid) and then use `msbd.rpc.client`;
they never exec, so the interpreter need not be reachable by those uids.
The users themselves are made by the `users` fixture (conftest), and
`shared` is a root daemon whose socket every one of them may use.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from msbd.daemon.access import Caller
from msbd.errors import DaemonUnavailable, RemoteError, RpcCode
from msbd.rpc.client import Client


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    groups: tuple[int, ...] = ()

    def caller(self) -> Caller:
        return Caller(uid=self.uid, gid=self.gid, groups=frozenset(self.groups))


ROOT = User("root", 0, 0)
SHARED_GID, SOCK_GID = 64010, 64011  # a group owning shared files; the socket's group
A = User("msbd-t-a", 64001, 64001, (SHARED_GID, SOCK_GID))
B = User("msbd-t-b", 64002, 64002)
C = User("msbd-t-c", 64003, 64003)


class AsUser:
    """`fn(ready)` run in a forked child as `user`; `ready()` tells the parent, `result()`
    is ("ok", value) | ("remote", error dict) | ("unavailable", message, errno) |
    ("raised", text)."""

    def __init__(self, user: User, fn: Callable[[Callable[[], None]], Any]) -> None:
        out_r, out_w = os.pipe()
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            try:
                os.close(out_r)
                os.close(ready_r)
                os.setgroups(list(user.groups))
                os.setresgid(user.gid, user.gid, user.gid)
                os.setresuid(user.uid, user.uid, user.uid)
                out: tuple[Any, ...]
                try:
                    out = ("ok", fn(lambda: os.write(ready_w, b"r") and None))
                except RemoteError as exc:
                    out = ("remote", {"code": exc.remote_code, "message": exc.message,
                                      "data": exc.remote_data})
                except DaemonUnavailable as exc:
                    cause = exc.__cause__
                    out = ("unavailable", exc.message,
                           cause.errno if isinstance(cause, OSError) else None)
                except BaseException as exc:
                    out = ("raised", f"{type(exc).__name__}: {exc}")
                with os.fdopen(out_w, "wb") as f:
                    f.write(pickle.dumps(out))
            finally:
                os._exit(0)
        os.close(out_w)
        os.close(ready_w)
        self.pid, self._out, self._ready = pid, out_r, ready_r

    def wait_ready(self) -> None:
        if os.read(self._ready, 1) != b"r":
            pytest.fail(f"the child ended before it was ready: {self.result()}")

    def result(self) -> Any:
        with os.fdopen(self._out, "rb") as f:
            data = f.read()
        os.close(self._ready)
        os.waitpid(self.pid, 0)
        return pickle.loads(data)


def outcome(sock: Path, user: User, method: str, params: Any = None) -> Any:
    def call(ready: Callable[[], None]) -> Any:
        with Client(sock, timeout=60) as c:
            return c.call(method, params)

    return AsUser(user, call).result()


def ok(sock: Path, user: User, method: str, params: Any = None) -> Any:
    got = outcome(sock, user, method, params)
    assert got[0] == "ok", got
    return got[1]


def refused(sock: Path, user: User, method: str, params: Any = None) -> dict[str, Any]:
    got = outcome(sock, user, method, params)
    assert got[0] == "remote", got
    return got[1]


def not_found(name: str) -> dict[str, Any]:
    return {"code": RpcCode.NOT_FOUND, "message": f"no sandbox named {name!r}",
            "data": {"sandbox": name}}


def names(listing: dict[str, Any]) -> set[str]:
    return {s["name"] for s in listing["sandboxes"]}


def sleeper(name: str, root: Path, **extra: Any) -> dict[str, Any]:
    return {"name": name, "rootfs": str(root), "exec": "/bin/busybox",
            "args": ["sleep", "600"], "memory_mib": 64} | extra
