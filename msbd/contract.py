"""The daemon<->worker contract: every value both sides of the process boundary must agree on.

The daemon never imports the worker (`msbd.vm`) and the worker never imports
the daemon: they meet across a process boundary, through inherited fds, a
spec, a status pipe and an exit status. What each side must read the way the
other wrote it is defined here, once, and both import it. Stdlib and msgspec
only, no I/O: the worker's import budget allows nothing more.

The fd map of a worker (`msbd.daemon.spawn` places it, `msbd.vm.fds` checks
it)::

    0   /dev/null
    1,2 write end of the console pipe (the sandbox's log)
    96  the launch spec: JSON of `msbd.model.WorkerSpec`, a memfd or a pipe
        whose write end the daemon has closed (secrets never go on argv)
    97  read end of the watchdog pipe, not close-on-exec; EOF = daemon gone
    98  write end of the status pipe

The status pipe (fd 98) carries one ASCII line per message, each written
with a single `write` (so lines never interleave)::

    entering          configuration done; the next call is krun_start_enter
    heartbeat         every `heartbeat_interval` seconds after `entering`
    error <text>      why the worker is about to exit; at most one, always
                      before the worker's own exit statuses 2-5

The worker's exit status is the workload's (0-255, libkrun exits with it),
or one of the worker's own (`WorkerExit`, 128+n after a signal). Statuses
2-5 are a failed launch when they come with an `error` line or before
`entering`; that line, not the number, tells them from a workload's status
(`msbd.states.end_reason`).

The host check (`python -m msbd.vm doctor --json`) prints a `HostReport`;
the daemon decodes it into the same struct and hands its `CheckInfo`s to
`daemon.info` as they are.
"""

from __future__ import annotations

import enum
import signal
from typing import Final

import msgspec

# --- the fd map ---------------------------------------------------------------------

SPEC_FD: Final = 96
WATCHDOG_FD: Final = 97
STATUS_FD: Final = 98
STDIO_FDS: Final = (0, 1, 2)

# --- the fork server -------------------------------------------------------------------
# `python -m msbd.vm zygote` (msbd.vm.zygote) has a SOCK_SEQPACKET socket on this fd.
# Once its imports are done the server sends FORK_READY; no request comes before it.
# A request is the datagram FORK_REQUEST carrying, by SCM_RIGHTS, the child's ends
# of one new worker's pipes in the order of FORK_FDS; the reply is `pid <n>` (the
# new worker, by then a child of the daemon) or `failed <text>`. EOF ends the server.
FORK_SERVER_FD: Final = 3
FORK_READY: Final = b"ready"
FORK_REQUEST: Final = b"fork"
FORK_FDS: Final = (SPEC_FD, STATUS_FD, 1, WATCHDOG_FD)  # where each passed fd goes (1: and 2)
_FORKED, _FORK_FAILED = b"pid", b"failed"


def fork_reply(pid: int | None, why: str = "") -> bytes:
    """The fork server's answer: the new worker's pid, or (None) why there is none."""
    return _FORKED + b" %d" % pid if pid is not None else _FORK_FAILED + b" " + why.encode()


def parse_fork_reply(reply: bytes) -> int | str:
    """A fork server's answer: the pid, or the text of a failure (also for an answer that
    is neither, quoted)."""
    word, _, rest = reply.partition(b" ")
    if word == _FORKED and rest.isdigit():
        return int(rest)
    if word == _FORK_FAILED:
        return rest.decode(errors="replace")
    return f"not an answer: {reply[:64]!r}"


# --- the status pipe -----------------------------------------------------------------


class StatusWord(enum.StrEnum):
    """The first word of a status-pipe line."""

    ENTERING = "entering"
    HEARTBEAT = "heartbeat"
    ERROR = "error"


def status_line(word: StatusWord, text: bytes = b"") -> bytes:
    """One status-pipe line: `word` (for an `error`, then a space and `text`), a newline."""
    if word is StatusWord.ERROR:
        return word.encode() + b" " + text + b"\n"
    if text:
        raise ValueError(f"a {word} line carries no text")
    return word.encode() + b"\n"


_WORDS: Final = {word.value: word for word in StatusWord}


def parse_status(line: str) -> tuple[StatusWord, str] | None:
    """(word, text) of one status-pipe line without its newline; None if it is no status
    line. Only `error` carries text ("" when the worker gave none).

    The daemon parses a heartbeat a second from every worker: the word is looked
    up in a dict, not by calling the enum (which raises and catches for a miss
    and costs several times more)."""
    head, _, text = line.partition(" ")
    word = _WORDS.get(head)
    if word is None:
        return None
    if text and word is not StatusWord.ERROR:
        return None
    return word, text.strip()


# --- exit statuses ---------------------------------------------------------------------


class WorkerExit(enum.IntEnum):
    """The worker's own exit statuses; anything else is the workload's, or 128+n.

    (Status 1 is also what an unexpected error in the worker itself gives: a
    traceback on stderr, no `error` line, a bug to report.)
    """

    CHECK_FAILED = 2
    """An fd, spec or host file check failed (also: a bad command line)."""
    NO_LIBKRUN = 3
    """No usable libkrun: every place looked is named on stderr."""
    CONFIG_FAILED = 4
    """A libkrun configuration call failed, the control channel could not be created,
    or the owner's identity could not be taken."""
    START_RETURNED = 5
    """`krun_start_enter` returned: libkrun refused to start the VM."""
    DAEMON_GONE = 6
    """Forced exit: EOF on the watchdog fd and the guest did not end within
    `shutdown_grace` + `shutdown_margin` seconds."""


LAUNCH_FAILURES: Final = frozenset({WorkerExit.CHECK_FAILED, WorkerExit.NO_LIBKRUN,
                                    WorkerExit.CONFIG_FAILED, WorkerExit.START_RETURNED})
"""The worker's statuses for a launch that never got a VM running (2-5)."""

SIGNAL_EXIT_BASE: Final = 128
"""A forced exit after signal n is `SIGNAL_EXIT_BASE + n` (143 for SIGTERM)."""


def signame(num: int) -> str:
    """Signal `num` by name (`SIGTERM`), as a run's end is worded everywhere: the
    daemon's end detail and msbctl's tables; `signal 99` for a number with no name."""
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


# --- the host check ----------------------------------------------------------------------


class CheckInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One line of `msbd doctor`: what was checked, whether it is fine, what to do."""

    name: str
    ok: bool
    detail: str
    hint: str | None = None


class HostReport(msgspec.Struct, frozen=True, kw_only=True):
    """What `python -m msbd.vm doctor --json` prints: the checks, and the libraries found."""

    checks: list[CheckInfo] = []
    libkrun: str | None = None
    libkrun_problem: str | None = None
    libkrun_version: str | None = None
    libkrunfw: str | None = None
    libkrunfw_version: str | None = None

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)
