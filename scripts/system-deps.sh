#!/bin/sh
# Install the Debian packages msbd's demo and tests need, when they are missing:
# gcc/make (to build the libkrun test double), busybox-static (the sandboxes'
# root filesystem in tests and the demo), systemd (systemd-analyze and
# systemd-socket-activate for the unit tests), qemu-utils (qemu-img makes the
# qcow2 and vmdk images the disk tests use). Needs root when anything is missing.
set -eu
missing=""
command -v gcc >/dev/null 2>&1 || missing="$missing gcc libc6-dev"
command -v make >/dev/null 2>&1 || missing="$missing make"
dpkg -s busybox-static >/dev/null 2>&1 || missing="$missing busybox-static"
command -v systemd-analyze >/dev/null 2>&1 || missing="$missing systemd"
command -v systemd-socket-activate >/dev/null 2>&1 || missing="$missing systemd"
command -v qemu-img >/dev/null 2>&1 || missing="$missing qemu-utils"
# shellcheck disable=SC2086
"$(dirname "$0")/apt-install" $missing
