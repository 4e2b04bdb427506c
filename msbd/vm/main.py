"""The worker's main line: fds → spec → libkrun → owner → host files, channel → enter.

Every module the worker imports is paid for by every launch (a pooled worker
pays before its spec arrives, but a burst of launches is bound by that CPU):
`argparse` is imported only when there are arguments, which a daemon's launch
never has; tests/test_vm_imports.py lists what the worker must not load.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final, NamedTuple

from msbd.contract import WorkerExit
from msbd.errors import FdCheckFailed, InvalidParams, KrunError
from msbd.model import WorkerSpec
from msbd.network import Network, needs_namespace, port_map_entries, rlimit_entries, tsi_features
from msbd.vm import control, fds, guard, hostfiles, krun, portrelay, spec
from msbd.vm.status import ENTERING, StatusPipe, error_line, say

if TYPE_CHECKING:
    import argparse

ROOT_DISK_ID: Final = "root"
ROOT_DISK_DEVICE: Final = "/dev/vda"  # the first disk added
LOG_INFO: Final = 3  # libkrun's log level from which the worker says more too


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["doctor"]:
        from msbd.vm import doctor

        return doctor.main(args[1:])
    return run(args)


class Options(NamedTuple):
    """The command line; a daemon's launch has none, so all defaults."""

    spec_file: str | None = None
    disk: tuple[str, ...] = ()
    mount: tuple[str, ...] = ()
    libkrun: str | None = None


def _options(argv: Sequence[str]) -> Options:
    if not argv:
        return Options()
    parsed = _parser().parse_args(argv)
    return Options(parsed.spec_file, tuple(parsed.disk), tuple(parsed.mount), parsed.libkrun)


def _parser() -> argparse.ArgumentParser:
    import argparse  # only for a worker run by hand (see the module's docstring)

    p = argparse.ArgumentParser(
        prog="python -m msbd.vm",
        description="msbd's worker: check the inherited fds 96/97/98, read the launch "
                    "spec, and become the VM. `python -m msbd.vm doctor` checks the host.")
    p.add_argument("--spec-file", metavar="PATH",
                   help="read the spec from this file instead of fd 96 (manual debugging)")
    p.add_argument("--disk", action="append", default=[], metavar="ID:HOST:FORMAT[:ro]",
                   help="add a disk, or replace the spec's disk with that id (repeatable)")
    p.add_argument("--mount", action="append", default=[], metavar="TAG:HOST[:ro]",
                   help="add a shared directory, or replace the one with that tag (repeatable)")
    p.add_argument("--libkrun", metavar="PATH", help="the libkrun to load (overrides the spec)")
    return p


def _fail(status: int, message: str, pipe: StatusPipe | None) -> int:
    """One line on stderr, the same as an `error` line on fd 98 when it is usable."""
    if pipe is not None:
        pipe.send(error_line(message))
    say(message)
    return status


def run(argv: Sequence[str]) -> int:
    opts = _options(argv)
    keep = {*fds.STDIO_FDS, fds.WATCHDOG_FD, fds.STATUS_FD}
    if opts.spec_file is None:
        keep.add(fds.SPEC_FD)
    leaked = fds.close_other_fds(keep)
    guard.block_signals()
    if leaked:
        say(f"closed {len(leaked)} inherited fd(s) that should not have been passed on: "
            f"{', '.join(map(str, leaked))}")

    try:
        fds.check_status_fd(fds.STATUS_FD)
    except FdCheckFailed as exc:
        return _fail(WorkerExit.CHECK_FAILED, str(exc), None)
    pipe = StatusPipe(fds.STATUS_FD)
    try:
        fds.check_watchdog_fd(fds.WATCHDOG_FD)
        if opts.spec_file is None:
            fds.check_spec_fd(fds.SPEC_FD)
    except FdCheckFailed as exc:
        return _fail(WorkerExit.CHECK_FAILED, str(exc), pipe)

    try:
        worker_spec = _read_spec(opts)
    except InvalidParams as exc:
        return _fail(WorkerExit.CHECK_FAILED, f"spec: {exc}", pipe)
    finally:
        if opts.spec_file is None:
            os.close(fds.SPEC_FD)  # the spec may hold secrets: no guest ever sees it
    fds.set_cloexec(fds.WATCHDOG_FD)
    fds.set_cloexec(fds.STATUS_FD)

    try:
        lib = krun.load(worker_spec.libkrun)
        if not lib.test_double:
            # libkrun loads the guest kernel by soname inside krun_start_enter, as the
            # owner by then; loaded now, that finds this copy (and a missing one is
            # said here, not as an obscure failure of the VM).
            krun.load_libkrunfw(beside=lib.path)
    except krun.LibraryNotLoadable as exc:
        return _fail(WorkerExit.NO_LIBKRUN, str(exc), pipe)
    relay = None
    if needs_namespace(network_of(worker_spec), worker_spec.ports):
        # Before the owner's identity: a namespace and its loopback need privileges.
        try:
            relay = portrelay.Relay.create(worker_spec.ports)
            krun.unshare_network()
            portrelay.loopback_up()
        except OSError as exc:
            return _fail(WorkerExit.CONFIG_FAILED,
                         "cannot give the VM a network namespace of its own (published "
                         f"ports without network access need one): {exc.strerror or exc}", pipe)
    # From here on the worker is the sandbox's owner: every host file is opened
    # with the owner's rights, libkrun's own opens included (msbd.vm.hostfiles).
    # Nothing is imported after this point: the owner need not be able to read
    # the interpreter's or msbd's files (every module used below is loaded).
    try:
        hostfiles.become_owner(worker_spec)
    except OSError as exc:
        return _fail(WorkerExit.CONFIG_FAILED,
                     f"cannot take the sandbox owner's identity (uid {worker_spec.uid}, "
                     f"gid {worker_spec.gid}): {exc.strerror or exc}", pipe)
    if relay is not None:
        try:
            relay.bind()  # as the owner: a port the owner may not bind stays refused
        except portrelay.PortUnavailable as exc:
            return _fail(WorkerExit.CONFIG_FAILED, str(exc), pipe)
    try:
        names = hostfiles.open_host_files(worker_spec)
    except hostfiles.HostFileRefused as exc:
        return _fail(WorkerExit.CHECK_FAILED, str(exc), pipe)
    channel = None
    if lib.has("krun_add_vsock_port2"):  # else no orderly stop on Linux (msbd.vm.control)
        try:
            channel = control.Channel.open(verbose=worker_spec.log_level >= LOG_INFO)
        except OSError as exc:
            return _fail(WorkerExit.CONFIG_FAILED,
                         f"cannot create the control channel: {exc}", pipe)
    try:
        ctx, eventfd = configure(lib, worker_spec, names, channel)
    except KrunError as exc:
        if channel is not None:
            channel.discard()
        return _fail(WorkerExit.CONFIG_FAILED, str(exc), pipe)

    pipe.send(ENTERING)  # first, so no heartbeat can come before it
    if channel is not None:
        channel.serve_in_background()
    if relay is not None:
        relay.serve_in_background()
    guard.start(watchdog_fd=fds.WATCHDOG_FD, status=pipe,
                heartbeat_interval=worker_spec.heartbeat_interval,
                shutdown=guard.Shutdown(worker_spec.shutdown_grace, worker_spec.shutdown_margin,
                                        channel=channel, eventfd=eventfd))
    error = lib.start_enter(ctx)
    if channel is not None:
        channel.discard()
    return _fail(WorkerExit.START_RETURNED, str(error), pipe)


def _read_spec(opts: Options) -> WorkerSpec:
    try:
        data = (spec.read_spec_fd(fds.SPEC_FD) if opts.spec_file is None
                else spec.read_spec_file(opts.spec_file))
    except OSError as exc:
        raise InvalidParams(f"cannot read it: {exc}") from None
    decoded = spec.decode_spec(data)
    if opts.disk or opts.mount or opts.libkrun:
        decoded = spec.with_overrides(decoded, disks=opts.disk, mounts=opts.mount,
                                      libkrun=opts.libkrun)
    return decoded


def network_of(s: WorkerSpec) -> Network:
    """The spec's network; a spec without one (a worker run by hand) gets none."""
    return Network.NONE if s.network is None else s.network


def configure(lib: krun.Krun, s: WorkerSpec, names: hostfiles.HostNames,
              channel: control.Channel | None = None) -> tuple[int, int | None]:
    """Every configuring call, in order; returns the context and the shutdown eventfd
    (None: this libkrun has none, as on Linux).

    Host files are given by `names` (the files the worker opened), never by the
    spec's paths, which libkrun would resolve again.
    """
    lib.set_log_level(s.log_level)
    ctx = lib.create_ctx()
    lib.set_vm_config(ctx, s.vcpus, s.memory_mib)
    network = network_of(s)
    lib.set_network(ctx, tsi_features(network, s.ports), port_map_entries(network, s.ports))
    if s.rlimits:
        lib.set_rlimits(ctx, rlimit_entries(s.rlimits))
    if names.rootfs is not None:
        lib.set_root(ctx, names.rootfs)
    elif s.root_disk is not None and names.root_disk is not None:
        # The first disk, so the guest has it as /dev/vda; its init mounts it (any
        # file system the kernel knows, read-only if the disk is) and switches into it.
        lib.add_disk(ctx, ROOT_DISK_ID, names.root_disk, s.root_disk.format,
                     s.root_disk.readonly)
        lib.set_root_disk_remount(ctx, ROOT_DISK_DEVICE, "auto", None)
    for mount, mount_name in zip(s.mounts, names.mounts, strict=True):
        lib.add_virtiofs(ctx, mount.tag, mount_name, mount.readonly)
    for disk, disk_name in zip(s.disks, names.disks, strict=True):
        lib.add_disk(ctx, disk.id, disk_name, disk.format, disk.readonly)
    if s.workdir is not None:
        lib.set_workdir(ctx, s.workdir)
    if channel is not None:
        lib.map_vsock_port(ctx, control.PORT, channel.path)
    lib.set_exec(ctx, s.exec, s.args,
                 spec.guest_env(s) + control.guest_env(s.shutdown_grace, channel))
    lib.set_identity(ctx, s.uid, s.gid)
    return ctx, lib.shutdown_eventfd(ctx)
