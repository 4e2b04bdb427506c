"""The blocking client and the async client against a real server on a Unix socket."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from test_rpc_server import Handler, running

from msbd.config import default_paths
from msbd.errors import DaemonUnavailable, RemoteError
from msbd.rpc.aclient import connect
from msbd.rpc.client import Client, default_socket_path
from msbd.rpc.methods import EventParams, NameParams, Subscription


async def test_blocking_client_calls(sock_dir: Path) -> None:
    async with running(sock_dir) as (path, _):
        def use() -> None:
            with Client(path, timeout=10) as client:
                assert client.call("daemon.ping") == "pong"
                with pytest.raises(RemoteError) as info:
                    client.call("sandbox.get", NameParams(name="box"))
                assert info.value.remote_code == -32001
                assert info.value.remote_data == {"sandbox": "box"}
                assert info.value.message == "no sandbox named 'box'"
                with pytest.raises(RemoteError) as info:
                    client.call("sandbox.get", {"name": "box", "x": 1})
                assert info.value.remote_code == -32602 and info.value.data == {"field": "x"}
                client.notify("daemon.ping")  # never answered: the next call still matches
                assert client.call_typed("events.subscribe") == Subscription(seq=7)
                notes = list(client.iter_notifications(timeout=5, typed=True))
                assert [m for m, _ in notes] == ["event"]
                assert isinstance(notes[0][1], EventParams)
                assert notes[0][1].event.seq == 8

        await anyio.to_thread.run_sync(use)


async def test_blocking_client_timeout(sock_dir: Path) -> None:
    handler = Handler()
    async with running(sock_dir, handler) as (path, _):
        def use() -> None:
            with Client(path) as client:
                with pytest.raises(TimeoutError, match=r"sandbox\.wait"):
                    client.call("sandbox.wait", {"name": "a"}, timeout=0.05)
                anyio.from_thread.run_sync(handler.gate("a")[1].set)
                assert client.call("daemon.ping") == "pong"  # the late reply is skipped

        await anyio.to_thread.run_sync(use)


def test_missing_socket_says_path_and_daemon(sock_dir: Path) -> None:
    path = str(sock_dir / "none.sock")
    with pytest.raises(DaemonUnavailable, match="is msbd running") as info:
        Client(path)
    assert path in str(info.value)
    assert isinstance(info.value, ConnectionError)


def test_refused_socket_says_stale(sock_dir: Path) -> None:
    path = str(sock_dir / "stale.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(path)  # bound, never listening: like a daemon that died
        with pytest.raises(DaemonUnavailable, match="not running") as info:
            Client(path)
    assert path in str(info.value)


@pytest.mark.parametrize(("env", "expected"), [
    ({"MSBD_SOCKET": "/x/y.sock", "XDG_RUNTIME_DIR": "/run/user/5"}, "/x/y.sock"),
    ({"XDG_RUNTIME_DIR": "/run/user/5"}, "/run/user/5/msbd/msbd.sock"),
    ({}, f"/tmp/msbd-{os.getuid()}/msbd/msbd.sock"),  # where the daemon listens then
])
def test_default_socket_path(monkeypatch: pytest.MonkeyPatch, env: dict[str, str],
                             expected: str) -> None:
    if os.getuid() == 0 and "MSBD_SOCKET" not in env:
        expected = "/run/msbd/msbd.sock"
    monkeypatch.delenv("MSBD_SOCKET", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert default_socket_path() == expected


@pytest.mark.parametrize("env", [{"XDG_RUNTIME_DIR": "/run/user/5"}, {}])
def test_the_client_looks_where_the_daemon_listens(monkeypatch: pytest.MonkeyPatch,
                                                    env: dict[str, str]) -> None:
    monkeypatch.delenv("MSBD_SOCKET", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert default_socket_path() == default_paths()[0]


def test_blocking_client_imports_no_async_stack() -> None:
    code = ("import sys, msbd.rpc.client; "
            "bad = {'anyio', 'uvloop', 'aiosqlite'} & set(sys.modules); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


async def test_async_client_multiplexes_calls(sock_dir: Path) -> None:
    handler = Handler()
    async with running(sock_dir, handler) as (path, _), connect(path) as client:
        results: dict[str, object] = {}
        done = {"a": anyio.Event(), "b": anyio.Event()}

        async def wait(name: str) -> None:
            results[name] = await client.call("sandbox.wait", {"name": name})
            done[name].set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(wait, "a")
            tg.start_soon(wait, "b")
            await handler.gate("a")[0].wait()
            await handler.gate("b")[0].wait()
            assert await client.call("daemon.ping") == "pong"
            handler.gate("b")[1].set()
            await done["b"].wait()
            assert "a" not in results
            handler.gate("a")[1].set()
        assert results == {"a": {"waited": "a"}, "b": {"waited": "b"}}
        with pytest.raises(RemoteError) as info:
            await client.call("sandbox.get", {"name": "zz"})
        assert info.value.remote_code == -32001


async def test_async_client_notifications(sock_dir: Path) -> None:
    async with running(sock_dir) as (path, _), connect(path) as client:
        assert await client.call_typed("events.subscribe") == Subscription(seq=7)
        with anyio.fail_after(5):
            async for method, params in client.notifications(typed=True):
                assert method == "event" and isinstance(params, EventParams)
                break


async def test_async_client_missing_socket(sock_dir: Path) -> None:
    with pytest.raises(DaemonUnavailable, match="is msbd running"):
        async with connect(sock_dir / "none.sock"):
            pass


def test_serves_on_uvloop(sock_dir: Path) -> None:
    """The daemon runs on uvloop: the same server and async client there."""

    async def main() -> None:
        async with running(sock_dir) as (path, _), connect(path) as client:
            async with anyio.create_task_group() as tg:
                for _ in range(20):
                    tg.start_soon(client.call, "daemon.ping")
            assert await client.call("daemon.ping") == "pong"
            assert await client.call_typed("events.subscribe") == Subscription(seq=7)
            async for method, _params in client.notifications():
                assert method == "event"
                break

    anyio.run(main, backend="asyncio", backend_options={"use_uvloop": True})
