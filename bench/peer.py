"""The peer: supervisord (from PyPI, optional) with a generated config, and an XML-RPC client.

The client speaks HTTP/1.1 POST on one keep-alive connection to supervisord's
Unix socket and parses replies with `xmlrpc.client.loads`, like supervisorctl
minus its per-call connection setup (stdlib `xmlrpc.client.ServerProxy` with
supervisor's transport opens a new connection per call; msbd's clients keep
theirs, so we keep ours too). The load generator sends the same bytes and
reads the framed reply without parsing it, as it does for msbd.
"""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import time
import xmlrpc.client
from pathlib import Path
from typing import Any

from bench.common import PYTHON
from bench.loadgen import http_request

SKIP_MESSAGE = ("supervisor is not installed: the supervisord peer part was NOT run "
                "(pip install -r bench/requirements.txt)")


def available() -> bool:
    return importlib.util.find_spec("supervisor") is not None


class XmlRpcClient:
    """XML-RPC over HTTP/1.1 keep-alive on a Unix socket."""

    def __init__(self, path: Path, timeout: float = 60.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.buf = bytearray()

    def close(self) -> None:
        self.sock.close()

    def call(self, method: str, *params: Any) -> Any:
        self.sock.sendall(http_request(xmlrpc.client.dumps(params, method).encode()))
        body = self._read_response()
        return xmlrpc.client.loads(body)[0][0]

    def _recv(self) -> None:
        chunk = self.sock.recv(262144)
        if not chunk:
            raise ConnectionError("supervisord closed the connection")
        self.buf += chunk

    def _read_response(self) -> bytes:
        while (end := self.buf.find(b"\r\n\r\n")) < 0:
            self._recv()
        head = bytes(self.buf[:end]).decode("latin-1").lower()
        del self.buf[:end + 4]
        headers = dict(line.split(":", 1) for line in head.split("\r\n")[1:] if ":" in line)
        if "content-length" in headers:
            length = int(headers["content-length"])
            while len(self.buf) < length:
                self._recv()
            body = bytes(self.buf[:length])
            del self.buf[:length]
            return body
        body = b""
        while True:  # chunked
            while (nl := self.buf.find(b"\r\n")) < 0:
                self._recv()
            size = int(bytes(self.buf[:nl]).split(b";")[0], 16)
            while len(self.buf) < nl + 2 + size + 2:
                self._recv()
            body += bytes(self.buf[nl + 2:nl + 2 + size])
            del self.buf[:nl + 2 + size + 2]
            if size == 0:
                return body


class Supervisord:
    """supervisord in the foreground, with `programs` copies of `command`, none autostarted.

    `stopsignal=KILL`: with `startsecs=0`, `startProcess` answers as soon as it
    forked, before the child exec'd; a SIGTERM in that window is taken by the
    child's copy of supervisord's handler and lost, and the stop would then
    wait out `stopwaitsecs`. Stopping is never timed, so KILL changes no figure.
    """

    def __init__(self, base: Path, *, programs: int, command: str = "/bin/sleep 600") -> None:
        self.base = base
        base.mkdir(parents=True, exist_ok=True)
        self.socket = base / "supervisor.sock"
        self.programs = [f"p{i}" for i in range(programs)]
        self.command = command
        self.proc: subprocess.Popen[bytes] | None = None

    def config(self) -> str:
        logs = self.base / "childlogs"
        logs.mkdir(exist_ok=True)
        parts = [
            f"[unix_http_server]\nfile={self.socket}\n",
            "[rpcinterface:supervisor]\n"
            "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n",
            f"[supervisord]\nnodaemon=true\nlogfile={self.base / 'supervisord.log'}\n"
            f"pidfile={self.base / 'supervisord.pid'}\nchildlogdir={logs}\n"
            "loglevel=info\nminfds=20000\n",
        ]
        parts += [f"[program:{name}]\ncommand={self.command}\nautostart=false\n"
                  "autorestart=false\nstartsecs=0\nstopsignal=KILL\n"
                  for name in self.programs]
        return "\n".join(parts)

    def start(self, timeout: float = 60.0) -> Supervisord:
        conf = self.base / "supervisord.conf"
        conf.write_text(self.config())
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "supervisor.supervisord", "-c", str(conf)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=(self.base / "supervisord.stderr").open("wb"))
        deadline = time.monotonic() + timeout
        # supervisord has no readiness protocol: its socket answering getState is the fact.
        while True:
            try:
                client = self.client()
                try:
                    if client.call("supervisor.getState")["statename"] == "RUNNING":
                        return self
                finally:
                    client.close()
            except (OSError, xmlrpc.client.Error):
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("supervisord did not start: " + (
                    self.base / "supervisord.stderr").read_text(errors="replace")[-2000:])
            time.sleep(0.05)

    def client(self) -> XmlRpcClient:
        return XmlRpcClient(self.socket)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self, timeout: float = 60.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
