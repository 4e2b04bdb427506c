#!/bin/sh
# Install the Debian packages scripts/nested-kvm needs, when they are missing:
# qemu-system-x86 (the TCG guest), linux-image-amd64 (its kernel and modules; it brings
# kmod for modinfo/depmod), busybox-static (the initramfs userland), e2fsprogs (mkfs.ext4
# for the scratch disk). Needs root when anything is missing.
set -eu
missing=""
command -v qemu-system-x86_64 >/dev/null 2>&1 || missing="$missing qemu-system-x86"
ls /boot/vmlinuz-* >/dev/null 2>&1 || missing="$missing linux-image-amd64"
PATH=$PATH:/usr/sbin:/sbin
command -v modinfo >/dev/null 2>&1 || missing="$missing kmod"
command -v depmod >/dev/null 2>&1 || missing="$missing kmod"
dpkg -s busybox-static >/dev/null 2>&1 || missing="$missing busybox-static"
command -v mkfs.ext4 >/dev/null 2>&1 || missing="$missing e2fsprogs"
# shellcheck disable=SC2086
"$(dirname "$0")/../apt-install" $missing
