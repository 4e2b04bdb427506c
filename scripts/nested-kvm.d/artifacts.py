"""What the nested-KVM guest boots from, built once and cached by a digest of its inputs.

Two artifacts per kernel: the kernel as an uncompressed ELF (booted through its PVH entry
point, which skips the several seconds TCG spends unpacking an xz bzImage) and the
initramfs (busybox, the first-stage init, the modules to reach the host's root). They live
in `${MSBD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/msbd}/nested-kvm/<key>/`, where key
digests the kernel version, the kernel image, busybox, the files the build reads and the
module list. A build goes to a temporary directory renamed into place, so concurrent
runs never see half an artifact; whoever renames second drops its copy.
"""

from __future__ import annotations

import hashlib
import lzma
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Loaded in this order by the first-stage init; modprobe brings their dependencies.
MODULES = ("virtio_pci", "virtio_console", "9pnet_virtio", "9p", "overlay", "virtio_blk",
           "crc32c_generic", "ext4", "kvm_amd")
# quiet: the console is for diagnosis only. panic=-1 with QEMU's -no-reboot turns a panic
# into QEMU exiting. The rest trims work TCG makes expensive.
KERNEL_ARGS = ("console=ttyS0", "quiet", "loglevel=4", "panic=-1", "mitigations=off",
               "init_on_alloc=0", "tsc=reliable", "no_timer_check", "audit=0")
BUILD_FILES = ("init", "stage2", "mkinitramfs", "artifacts.py")  # what the build reads
LAYOUT = "1"  # bump when what goes into a cache entry changes without its inputs changing
BUSYBOX = Path("/bin/busybox")
XZ_MAGIC = b"\xfd7zXZ\x00"


@dataclass(frozen=True)
class Boot:
    dir: Path
    kernel: Path
    initramfs: Path


def cache_root() -> Path:
    if base := os.environ.get("MSBD_CACHE"):
        return Path(base) / "nested-kvm"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "msbd" / "nested-kvm"


def missing_deps() -> list[str]:
    missing = [cmd for cmd in ("qemu-system-x86_64", "mkfs.ext4", "modinfo", "depmod")
               if shutil.which(cmd, path="/usr/sbin:/sbin:/usr/bin:/bin") is None]
    if not BUSYBOX.exists():
        missing.append(str(BUSYBOX))
    if not list(Path("/boot").glob("vmlinuz-*")):
        missing.append("/boot/vmlinuz-*")
    return missing


def ensure_deps() -> None:
    """Install the Debian packages when something is missing (deps.sh), then re-check."""
    if not missing_deps():
        return
    subprocess.run([str(HERE / "deps.sh")], check=False)
    if still := missing_deps():
        raise SystemExit(f"nested-kvm: still missing: {', '.join(still)} "
                         f"(scripts/nested-kvm.d/deps.sh installs them as root)")


def version_key(version: str) -> list[tuple[int, str]]:
    return [(int(p), "") if p.isdigit() else (-1, p) for p in re.split(r"[.-]", version)]


def pick_kernel(wanted: str | None) -> str:
    """The kernel version to boot: the one asked for, else the newest with its modules."""
    found = sorted((p.name[len("vmlinuz-"):] for p in Path("/boot").glob("vmlinuz-*")
                    if (Path("/lib/modules") / p.name[len("vmlinuz-"):]).is_dir()),
                   key=version_key)
    if wanted:
        if wanted not in found:
            raise SystemExit(f"nested-kvm: no kernel {wanted} with modules (have: {found})")
        return wanted
    if not found:
        raise SystemExit("nested-kvm: no /boot/vmlinuz-* with /lib/modules (linux-image-amd64)")
    return found[-1]


def cache_key(kver: str) -> str:
    h = hashlib.sha256()
    h.update(f"layout {LAYOUT}\nkernel {kver}\nmodules {' '.join(MODULES)}\n".encode())
    inputs = [Path(f"/boot/vmlinuz-{kver}"), BUSYBOX, *(HERE / name for name in BUILD_FILES)]
    for path in inputs:
        h.update(f"{path.name} {path.stat().st_size}\n".encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:20]


def extract_vmlinux(bzimage: Path, out: Path) -> bool:
    """Unpack the ELF kernel from an xz-compressed bzImage; False when it is not one."""
    data = bzimage.read_bytes()
    at = data.find(XZ_MAGIC)
    if at < 0:
        return False
    try:
        elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[at:])
    except lzma.LZMAError:
        return False
    if not elf.startswith(b"\x7fELF"):
        return False
    out.write_bytes(elf)
    return True


def has_pvh(kver: str) -> bool:
    config = Path(f"/boot/config-{kver}")
    return config.exists() and "\nCONFIG_PVH=y\n" in config.read_text()


def build(kver: str, dest: Path, log: Callable[[str], None] | None) -> None:
    root = dest.parent
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
    try:
        bzimage = Path(f"/boot/vmlinuz-{kver}")
        if not (has_pvh(kver) and extract_vmlinux(bzimage, tmp / "vmlinux")):
            shutil.copyfile(bzimage, tmp / "vmlinux")  # boots, just more slowly
            if log:
                log(f"booting the compressed {bzimage}: no PVH ELF kernel could be unpacked")
        subprocess.run([str(HERE / "mkinitramfs"), str(tmp / "initramfs.cpio"), kver,
                        str(HERE / "init"), str(HERE / "stage2"), *MODULES], check=True)
        (tmp / "inputs").write_text(f"kernel {kver}\nmodules {' '.join(MODULES)}\n")
        try:
            tmp.rename(dest)
        except OSError:
            if not dest.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def boot_artifacts(kernel: str | None, log: Callable[[str], None] | None = None) -> Boot:
    kver = pick_kernel(kernel)
    dest = cache_root() / f"{kver}-{cache_key(kver)}"
    if not (dest / "initramfs.cpio").exists():
        if log:
            log(f"building the kernel and initramfs for {kver} into {dest}")
        build(kver, dest, log)
    return Boot(dir=dest, kernel=dest / "vmlinux", initramfs=dest / "initramfs.cpio")


if __name__ == "__main__":
    print(boot_artifacts(sys.argv[1] if len(sys.argv) > 1 else None).dir)
