"""The blocking JSON-RPC client: one plain socket, for msbctl and other Python programs.

Imports only the codec, the method table and the stdlib (+ msgspec): no
anyio, uvloop or aiosqlite, so msbctl starts fast. `msbd.rpc.aclient` is the
anyio-based twin.
"""

from __future__ import annotations

import collections
import os
import socket
import time
from collections.abc import Iterator
from typing import Any, Final

import msgspec

from msbd.config import default_socket
from msbd.errors import DaemonUnavailable
from msbd.rpc.codec import encode_notification, encode_request
from msbd.rpc.framing import Framer
from msbd.rpc.methods import METHODS, NOTIFICATIONS
from msbd.rpc.replies import Notification, Response, decode_message

RECV_SIZE: Final = 256 * 1024
"""Bytes asked of the socket per read (both clients)."""


def default_socket_path() -> str:
    """Where msbd listens: `$MSBD_SOCKET` (the daemon's setting of that name), else the
    daemon's default (`msbd.config.default_socket`)."""
    return os.environ.get("MSBD_SOCKET") or default_socket()


def connect_error(path: str, exc: OSError) -> DaemonUnavailable:
    """A clear message for a failed connect (shared with the async client)."""
    if isinstance(exc, FileNotFoundError):
        why = "no socket there: is msbd running? (set MSBD_SOCKET or pass the path)"
    elif isinstance(exc, ConnectionRefusedError):
        why = "connection refused: msbd is not running (the socket is stale)"
    elif isinstance(exc, PermissionError):
        why = "permission denied: are you in the socket's group?"
    else:
        why = f"{exc.strerror or exc}"
    return DaemonUnavailable(f"cannot connect to msbd at {path}: {why}",
                             data={"socket": path})


def result_type(method: str) -> Any:
    """The result type `method` answers with, from the method table."""
    try:
        return METHODS[method].result
    except KeyError:
        raise ValueError(f"unknown method {method!r}") from None


class Client:
    """A blocking connection to msbd. Use as a context manager, or `close()` it."""

    def __init__(self, path: str | os.PathLike[str] | None = None, *,
                 timeout: float | None = None) -> None:
        """Connect to `path` (default: `default_socket_path()`).

        `timeout` (seconds) bounds the connect and is the default for each call.
        """
        self.path = os.fspath(path) if path is not None else default_socket_path()
        self.timeout = timeout
        self._ids = 0
        self._frames = Framer()
        self._notifications: collections.deque[Notification] = collections.deque()
        self._decoders: dict[str, msgspec.json.Decoder[Any]] = {}
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.settimeout(timeout)
            self._sock.connect(self.path)
        except TimeoutError:
            self._sock.close()
            raise TimeoutError(f"connecting to msbd at {self.path} timed out") from None
        except OSError as exc:
            self._sock.close()
            raise connect_error(self.path, exc) from exc

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()

    def call(self, method: str, params: Any = None, *, timeout: float | None = None) -> Any:
        """Call `method` with `params` (dict, Struct or None) and return the JSON result.

        `timeout`: seconds to wait for the reply (None: the client's default,
        and if that is None too, as long as it takes).
        Raises `RemoteError` on an error reply, `TimeoutError`, `DaemonUnavailable`.
        """
        return msgspec.json.decode(self._call(method, params, timeout))

    def call_typed(self, method: str, params: Any = None, *,
                   timeout: float | None = None) -> Any:
        """Like `call`, decoding the result into the method's result type."""
        decoder = self._decoders.get(method)
        if decoder is None:
            decoder = self._decoders[method] = msgspec.json.Decoder(result_type(method))
        return decoder.decode(self._call(method, params, timeout))

    def notify(self, method: str, params: Any = None) -> None:
        """Send a notification: the daemon runs it and never answers."""
        self._send(encode_notification(method, params))

    def iter_notifications(self, *, timeout: float | None = None,
                           typed: bool = False) -> Iterator[tuple[str, Any]]:
        """Yield (method, params) of notifications as they arrive (after `events.subscribe`).

        Stops after `timeout` seconds without one (None: wait forever). With
        `typed`, params of known notifications are decoded into their Struct.
        """
        while True:
            if not self._notifications:
                try:
                    self._read_one(None if timeout is None else time.monotonic() + timeout)
                except TimeoutError:
                    return
                continue
            note = self._notifications.popleft()
            kind = NOTIFICATIONS.get(note.method) if typed else None
            yield note.method, msgspec.json.decode(note.params, type=kind or Any)

    # --- internals ---

    def _call(self, method: str, params: Any, timeout: float | None) -> msgspec.Raw:
        self._ids += 1
        rid = self._ids
        self._send(encode_request(method, params, rid))
        timeout = self.timeout if timeout is None else timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                msg = self._read_one(deadline)
            except TimeoutError:
                raise TimeoutError(f"no reply to {method} within {timeout}s") from None
            if isinstance(msg, Response) and (
                    msg.id == rid or (msg.id is None and msg.error is not None)):
                return msg.unwrap()  # an error with id null is about our request
            # A late reply to an earlier call that timed out: not ours, skip it.

    def _send(self, data: bytes) -> None:
        try:
            self._sock.sendall(data + b"\n")
        except OSError as exc:
            raise DaemonUnavailable(f"connection to msbd at {self.path} lost: {exc}",
                                    data={"socket": self.path}) from exc

    def _read_one(self, deadline: float | None) -> Response | Notification | None:
        """Read one message; notifications are queued and returned as None."""
        while (line := self._frames.pop()) is None:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                self._sock.settimeout(left)
            else:
                self._sock.settimeout(None)
            try:
                data = self._sock.recv(RECV_SIZE)
            except TimeoutError:
                raise
            except OSError as exc:
                raise DaemonUnavailable(f"connection to msbd at {self.path} lost: {exc}",
                                        data={"socket": self.path}) from exc
            if not data:
                raise DaemonUnavailable(f"msbd closed the connection at {self.path}",
                                        data={"socket": self.path})
            self._frames.feed(data)
        if not line.strip():
            return None
        msg = decode_message(line)
        if isinstance(msg, Notification):
            self._notifications.append(msg)
            return None
        if isinstance(msg, list):
            return None  # this client sends no batches
        return msg
