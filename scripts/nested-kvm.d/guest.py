"""One QEMU guest of the nested-KVM lane: start it, relay it, hold its deadlines, stop it.

How it works: QEMU talks to us through FIFO pairs in the run directory (its `pipe`
chardevs): the serial console (kernel and init messages, logged for diagnosis) and the
two virtio serial ports carrying CMD's stdout and stderr (see relay.py for the markers).
We open every FIFO O_RDWR, so opening never blocks and reading never sees EOF: the end of
the run is QEMU's exit, watched through a pidfd. One selector loop waits on all of it
and on a deadline:
  booting   until the "start" marker, at most --boot-timeout;
  running   until both ports' end markers, at most --timeout (if given);
  stopping  after we answered the end markers, the guest powers itself off, at most
            POWEROFF_GRACE.
A signal (SIGINT, SIGTERM, SIGHUP) only notes itself and wakes the loop, which stops
QEMU (SIGTERM, then SIGKILL) and returns 128+N. QEMU is also killed if we die (pdeathsig)
and sits in its own process group, so a terminal's Ctrl-C reaches only us.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import artifacts
import relay

# The lane's own exit statuses, chosen like timeout(1) and env(1).
EXIT_TIMEOUT = 124
EXIT_LANE = 125
POWEROFF_GRACE = 30.0
KILL_GRACE = 5.0
CONSOLE_TAIL = 40  # lines of console shown when the guest failed
KICK_INTERVAL = 5.0  # while CMD runs, a line to the guest on its stdout port this often
DIAG_WAIT = 30.0  # how long a guest stuck past --timeout gets to say what it is doing
DIAG_DONE = b"nested-kvm: diag: done"  # stage2's last line of the dump
DIAG_TAIL = 400  # lines of console shown then (the kernel's backtraces)
PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Options:
    cpus: int
    memory_mib: int
    timeout: float | None
    boot_timeout: float
    verbose: bool
    kernel_args: tuple[str, ...] = ()  # appended to artifacts.KERNEL_ARGS (--systemd's)


def qemu_command(opts: Options, boot: artifacts.Boot, run: Path) -> list[str]:
    append = " ".join([*artifacts.KERNEL_ARGS, *opts.kernel_args, f"nkvm.run={run}"])
    cmd = [
        "qemu-system-x86_64", "-accel", "tcg,thread=multi", "-cpu", "max",
        "-smp", str(opts.cpus), "-m", str(opts.memory_mib),
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-kernel", str(boot.kernel), "-initrd", str(boot.initramfs), "-append", append,
        "-chardev", f"pipe,id=con,path={run}/console", "-serial", "chardev:con",
        "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,"
                   "multidevs=remap",
        "-drive", f"file={run}/scratch.img,format=raw,if=virtio,cache=unsafe",
        "-device", "virtio-serial-pci,id=vser",
    ]
    for name in ("stdout", "stderr"):
        cmd += ["-chardev", f"pipe,id={name},path={run}/{name}",
                "-device", f"virtserialport,bus=vser.0,chardev={name},name=nkvm.{name}"]
    return cmd


def die_with_parent() -> None:
    """In the QEMU child, before exec: get SIGKILL when the lane's process dies."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class Guest:
    def __init__(self, opts: Options, boot: artifacts.Boot, run: Path, token: str,
                 say: Callable[[str], None]) -> None:
        self.opts, self.run, self.say = opts, run, say
        self.fifos: dict[str, int] = {}
        for name in ("console", "stdout", "stderr"):
            for end in ("in", "out"):
                path = run / f"{name}.{end}"
                os.mkfifo(path, 0o600)
                self.fifos[f"{name}.{end}"] = os.open(path, os.O_RDWR | os.O_NONBLOCK)
        self.console_log = open(run / "console.log", "wb")  # noqa: SIM115 (see close)
        self.console_tail = bytearray()
        self.out = relay.Stream(1, token)
        self.err = relay.Stream(2, token)
        self.caught: list[int] = []
        self.wakeup_r, self.wakeup_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self.wakeup_w)
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, lambda n, _frame: self.caught.append(n))
        self.t0 = time.monotonic()
        with open(run / "qemu.log", "wb") as qemu_log:
            self.proc = subprocess.Popen(  # no threads here, so preexec_fn is safe
                qemu_command(opts, boot, run), stdin=subprocess.DEVNULL, stdout=qemu_log,
                stderr=subprocess.STDOUT, process_group=0,
                preexec_fn=die_with_parent)  # noqa: PLW1509
        self.pidfd = os.pidfd_open(self.proc.pid)

    def wait(self) -> int:
        """Relay until the guest is done; the lane's exit status."""
        sel = selectors.DefaultSelector()
        for fd in (self.pidfd, self.wakeup_r, self.fifos["console.out"],
                   self.fifos["stdout.out"], self.fifos["stderr.out"]):
            sel.register(fd, selectors.EVENT_READ)
        boot_deadline = self.t0 + self.opts.boot_timeout
        cmd_deadline: float | None = None
        answered: float | None = None
        next_kick = 0.0
        exited = False
        while not exited:
            if self.caught:
                self.stop()
                self.say(f"interrupted by signal {self.caught[0]}; stopped the guest")
                return 128 + self.caught[0]
            now = time.monotonic()
            if self.out.started and cmd_deadline is None:
                self.note(f"guest booted, CMD started after {now - self.t0:.1f} s")
                cmd_deadline = now + self.opts.timeout if self.opts.timeout else float("inf")
            if self.out.status is not None and self.err.ended and answered is None:
                self.note(f"CMD exited {self.out.status} after {now - self.t0:.1f} s")
                os.write(self.fifos["stdout.in"], b"\n")  # we have it all: power off
                answered = now
            if answered is not None:
                deadline = answered + POWEROFF_GRACE
            else:
                deadline = boot_deadline if cmd_deadline is None else cmd_deadline
            if now >= deadline:
                if answered is None and cmd_deadline is not None:
                    self.diagnose(sel)
                return self.expired(answered is not None, cmd_deadline is not None)
            if cmd_deadline is not None and answered is None:
                # Seen once: CMD's exit marker sat in QEMU's stdout port until something
                # came the other way on that port, and the run hung until --timeout. A
                # line to the guest every few seconds (stage2 ignores it) moves it on.
                if now >= next_kick:
                    self.send(b"kick\n")
                    next_kick = now + KICK_INTERVAL
                deadline = min(deadline, next_kick)
            exited = self.pump(sel, min(deadline - now, 3600.0))
        self.proc.wait()
        self.out.flush()
        self.err.flush()
        if self.out.status is not None and self.err.ended:
            self.note(f"guest powered off after {time.monotonic() - self.t0:.1f} s")
            return self.out.status
        return self.died()

    def pump(self, sel: selectors.BaseSelector, timeout: float) -> bool:
        """Relay whatever is ready; True once QEMU has exited and everything is read."""
        exited = False
        for key, _ in sel.select(timeout):
            if key.fd == self.pidfd:
                exited = True
            elif key.fd == self.wakeup_r:
                os.read(self.wakeup_r, 64)
            else:
                self.drain(key.fd)
        if exited:
            for name in ("console.out", "stdout.out", "stderr.out"):
                self.drain(self.fifos[name])
        return exited

    def diagnose(self, sel: selectors.BaseSelector) -> None:
        """CMD outlived --timeout: ask the guest (stage2) to dump its processes' states and
        kernel stacks (stderr) and the kernel's backtraces (console), and relay them."""
        self.say(f"CMD still running after --timeout {self.opts.timeout:g} s; asking the "
                 "guest what its processes are doing")
        self.send(b"diag\n")
        until = time.monotonic() + DIAG_WAIT
        while (left := until - time.monotonic()) > 0:
            if self.pump(sel, left):
                break
            if DIAG_DONE in self.err.recent:  # the console's backtraces may trail it a little
                self.pump(sel, min(left, 2.0))
                break
        if DIAG_DONE not in self.err.recent:
            self.say(f"the guest did not answer within {DIAG_WAIT:g} s: its kernel or its "
                     "init is stuck")
        self.show_console(DIAG_TAIL)

    def send(self, line: bytes) -> None:
        """A line to the guest's stage2 on the stdout port (dropped if QEMU is not reading)."""
        with contextlib.suppress(BlockingIOError):
            os.write(self.fifos["stdout.in"], line)

    def drain(self, fd: int) -> None:
        while True:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                return
            if fd == self.fifos["stdout.out"]:
                self.out.feed(data)
            elif fd == self.fifos["stderr.out"]:
                self.err.feed(data)
            else:
                self.console(data)

    def console(self, data: bytes) -> None:
        self.console_log.write(data)
        self.console_tail += data
        del self.console_tail[:-65536]
        if self.opts.verbose:
            sys.stderr.buffer.write(data)
            sys.stderr.flush()

    def expired(self, answered: bool, running: bool) -> int:
        self.stop()
        self.out.flush()
        self.err.flush()
        if answered:
            self.say(f"the guest did not power off within {POWEROFF_GRACE:.0f} s; "
                     "stopped it")
            return self.out.status if self.out.status is not None else EXIT_LANE
        if running:
            self.say("stopped the guest")
            return EXIT_TIMEOUT
        self.say(f"CMD had not started after --boot-timeout {self.opts.boot_timeout:g} s; "
                 "stopped the guest")
        self.show_console()
        return EXIT_LANE

    def died(self) -> int:
        """QEMU exited before CMD's end markers: say why, as far as the console tells."""
        text = self.console_tail.decode(errors="replace")
        if m := re.search(r"Kernel panic - not syncing:[^\n]*", text):
            self.say(f"the guest kernel panicked: {m.group(0).strip()}")
        elif m := re.search(r"nested-kvm init: ([^\n]*)", text):
            self.say(f"the guest's init failed: {m.group(1).strip()}")
        elif self.out.started:
            self.say("the guest stopped before CMD finished")
        else:
            self.say(f"the guest stopped before CMD started "
                     f"(qemu exit status {self.proc.returncode})")
        if qemu_text := (self.run / "qemu.log").read_text(errors="replace").strip():
            self.say("qemu said:\n" + qemu_text)
        self.show_console()
        return EXIT_LANE

    def show_console(self, count: int = CONSOLE_TAIL) -> None:
        if self.opts.verbose:
            return  # it is on stderr already
        lines = self.console_tail.decode(errors="replace").splitlines()[-count:]
        if not lines:
            self.say("the guest printed nothing on its console")
            return
        self.say("last lines of the guest console:\n" + "\n".join("  " + ln for ln in lines))

    def note(self, msg: str) -> None:
        if self.opts.verbose:
            self.say(msg)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL: QEMU never outlives the run."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(KILL_GRACE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def close(self) -> None:
        self.stop()
        signal.set_wakeup_fd(-1)
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_DFL)
        for fd in [*self.fifos.values(), self.pidfd, self.wakeup_r, self.wakeup_w]:
            os.close(fd)
        self.console_log.close()
