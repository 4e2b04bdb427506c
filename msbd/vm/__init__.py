"""The worker: one process per sandbox run, checks its fds, then becomes the VM.

`python -m msbd.vm` is started by the daemon with the fd map of
`msbd.contract` (the spec on 96, the watchdog on 97, the status pipe on 98).
It checks those fds, closes every other fd, reads and checks the spec, loads
libkrun (`WorkerSpec.libkrun`, then `$MSBD_LIBKRUN`, then `libkrun.so.1`),
becomes the sandbox's owner (`WorkerSpec.uid`, `gid`, `groups`, for good),
opens every host file of the spec itself and checks it (`hostfiles`), opens
the control channel its guest's init will dial (`control`), hands libkrun
those open files as `/proc/self/fd/N`, configures it and calls
`krun_start_enter`, which never returns: the guest runs in this process and
libkrun exits with the workload's exit status.

It reports on the status pipe (`entering`, `heartbeat`, `error <text>`: the
words of `msbd.contract`) and ends with an exit status of the contract.

Exit statuses (`msbd.contract.WorkerExit`). Statuses 2-5 come with one
`msbd-worker: ...` line on stderr and, when fd 98 itself is usable, the same text as an `error`
line; that line (not the number) is what tells them from a workload's status.
Before `entering` only 2-4 are possible; after it, the workload's status, 5,
6 or 128+n:

    0-255   the workload's exit status (libkrun exits with it)
    1       also: an unexpected error in the worker itself (a traceback on
            stderr, no `error` line) - a bug to report
    2       an fd, spec or host file check failed (also: a bad command line);
            a host file: `<disk 'id'|root disk|rootfs|mount 'tag'>: ...`
    3       no usable libkrun: every place looked is named on stderr
    4       a libkrun configuration call failed (the error names the call; a
            libkrun without krun_set_root_disk_remount cannot boot a root
            disk), the control channel could not be created, or the owner's
            identity could not be taken
    5       krun_start_enter returned: libkrun refused to start the VM
    6       forced exit: the daemon went away (EOF on fd 97) and the guest
            did not end within `shutdown_grace` + `shutdown_margin` seconds
    128+n   forced exit after signal n (143 for SIGTERM, 130 for SIGINT): the
            guest did not end within `shutdown_grace` + `shutdown_margin`
            seconds. A second SIGTERM/SIGINT forces the exit at once.

A signal or EOF on fd 97 asks the guest to stop in order over the control
channel (`control`): its init SIGTERMs the guest's processes, SIGKILLs what
is left after `shutdown_grace`, and the run then ends with the workload's own
status (often 143 or 137), not with 6 or 128+n. A libkrun without
`krun_add_vsock_port2` (and without a shutdown eventfd, which Linux builds
never have) gives no way to ask, and the worker exits at once with 128+n or 6.

By hand (bash), with the spec in a file and `--disk`/`--mount` extras (msb's
syntax) that add to or replace (same id/tag) the spec's disks and mounts:

    python -m msbd.vm --spec-file s.json --disk d:/img/d.qcow2:qcow2:ro 97< <(sleep inf) 98> >(cat)

`python -m msbd.vm doctor [--json] [--libkrun PATH]` checks the host instead.
This package imports only the stdlib, msgspec, `msbd.model`, `msbd.errors` and
`msbd.contract`. This file itself imports nothing: `python -m msbd.vm` runs it
before `__main__`, which must get to keep msgspec from importing
`typing_extensions` before anything imports msgspec.
"""

