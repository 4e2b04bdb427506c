"""libkrun through ctypes (the only ctypes user): one symbol table, lookup, errno translation."""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Mapping, Sequence
from typing import Any, Final, NamedTuple

from msbd.errors import KrunError
from msbd.errors import LibraryNotLoadable as LibraryNotLoadable  # noqa: PLC0414 (main.py)
from msbd.model import DiskFormat

SONAME: Final = "libkrun.so.1"
LIBKRUNFW_SONAMES: Final = ("libkrunfw.so.5", "libkrunfw.so.4")
ENV_VAR: Final = "MSBD_LIBKRUN"

_StrArray = ctypes.POINTER(ctypes.c_char_p)
_u32, _u8, _u64 = ctypes.c_uint32, ctypes.c_uint8, ctypes.c_uint64
_str, _bool, _i32 = ctypes.c_char_p, ctypes.c_bool, ctypes.c_int32


class Symbol(NamedTuple):
    name: str
    argtypes: tuple[Any, ...]
    restype: Any
    optional: bool = False


# Every libkrun function the worker calls, with its C signature (libkrun.h, described in
# docs/libkrun.md). An optional one may be missing: the worker then does without it or
# says why it cannot.
SYMBOLS: Final = (
    Symbol("krun_set_log_level", (_u32,), _i32),
    Symbol("krun_create_ctx", (), _i32),
    Symbol("krun_set_vm_config", (_u32, _u8, _u32), _i32),
    Symbol("krun_set_root", (_u32, _str), _i32),
    Symbol("krun_add_disk", (_u32, _str, _str, _bool), _i32, optional=True),
    Symbol("krun_add_disk2", (_u32, _str, _str, _u32, _bool), _i32, optional=True),
    Symbol("krun_set_root_disk_remount", (_u32, _str, _str, _str), _i32, optional=True),
    Symbol("krun_add_virtiofs", (_u32, _str, _str), _i32),
    Symbol("krun_add_virtiofs3", (_u32, _str, _str, _u64, _bool), _i32, optional=True),
    Symbol("krun_set_workdir", (_u32, _str), _i32),
    Symbol("krun_set_exec", (_u32, _str, _StrArray, _StrArray), _i32),
    Symbol("krun_disable_implicit_vsock", (_u32,), _i32),
    Symbol("krun_add_vsock", (_u32, _u32), _i32),
    Symbol("krun_set_port_map", (_u32, _StrArray), _i32),
    Symbol("krun_set_rlimits", (_u32, _StrArray), _i32),
    Symbol("krun_add_vsock_port2", (_u32, _u32, _str, _bool), _i32, optional=True),
    Symbol("krun_get_shutdown_eventfd", (_u32,), _i32, optional=True),
    Symbol("krun_setgid", (_u32, _u32), _i32),
    Symbol("krun_setuid", (_u32, _u32), _i32),
    Symbol("krun_start_enter", (_u32,), _i32),
)


def _b(text: str) -> bytes:
    return os.fsencode(text)


def _strv(items: Sequence[str]) -> Any:
    """An explicit NULL-terminated `char *[]`: never NULL itself."""
    return (ctypes.c_char_p * (len(items) + 1))(*[_b(s) for s in items], None)


def _path_of(address: int | None) -> str | None:
    """The file mapped at `address` in this process (/proc/self/maps)."""
    if address is None:
        return None
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                low, _, high = fields[0].partition("-")
                if len(fields) == 6 and int(low, 16) <= address < int(high, 16):
                    return fields[5].strip()
    except OSError:
        return None
    return None


def candidates(configured: str | None, environ: Mapping[str, str]) -> list[tuple[str, str]]:
    """(where it came from, name) in lookup order: setting, `$MSBD_LIBKRUN`, soname."""
    found: list[tuple[str, str]] = []
    if configured:
        found.append(("the daemon's libkrun setting", configured))
    if environ.get(ENV_VAR):
        found.append((f"${ENV_VAR}", environ[ENV_VAR]))
    found.append(("the soname", SONAME))
    return found


class Krun:
    """A loaded libkrun. Each method is one C call; a negative return raises `KrunError`."""

    def __init__(self, lib: ctypes.CDLL, name: str) -> None:
        self.name = name
        self._fns: dict[str, Any] = {}
        for sym in SYMBOLS:
            try:
                fn = lib[sym.name]
            except AttributeError:
                continue
            fn.argtypes = sym.argtypes
            fn.restype = sym.restype
            self._fns[sym.name] = fn
        try:
            lib["fakekrun_test_double"]
        except AttributeError:
            self.test_double = False
        else:
            self.test_double = True  # tests/fakekrun: records calls, runs no VM
        first = self._fns.get("krun_create_ctx")
        self.path = _path_of(ctypes.cast(first, ctypes.c_void_p).value if first else None) or name

    def missing(self) -> list[str]:
        return [s.name for s in SYMBOLS if not s.optional and s.name not in self._fns]

    def has(self, symbol: str) -> bool:
        return symbol in self._fns

    def _call(self, symbol: str, *args: Any) -> int:
        fn = self._fns.get(symbol)
        if fn is None:
            raise KrunError(symbol, errno.ENOSYS, f"not in this libkrun ({self.path})")
        ret = int(fn(*args))
        if ret < 0:
            raise KrunError(symbol, -ret, os.strerror(-ret))
        return ret

    def set_log_level(self, level: int) -> None:
        self._call("krun_set_log_level", level)

    def create_ctx(self) -> int:
        return self._call("krun_create_ctx")

    def set_vm_config(self, ctx: int, vcpus: int, memory_mib: int) -> None:
        self._call("krun_set_vm_config", ctx, vcpus, memory_mib)

    def set_root(self, ctx: int, path: str) -> None:
        self._call("krun_set_root", ctx, _b(path))

    def add_disk(self, ctx: int, block_id: str, path: str, fmt: DiskFormat,
                 readonly: bool) -> None:
        """`krun_add_disk2` with the explicit format; `krun_add_disk` only for raw."""
        if self.has("krun_add_disk2"):
            self._call("krun_add_disk2", ctx, _b(block_id), _b(path), fmt.krun_code, readonly)
        elif fmt is DiskFormat.RAW and self.has("krun_add_disk"):
            self._call("krun_add_disk", ctx, _b(block_id), _b(path), readonly)
        else:
            raise KrunError("krun_add_disk2", errno.ENOSYS,
                            f"not in this libkrun ({self.path}), and krun_add_disk only "
                            f"takes raw images: disk {block_id!r} is {fmt.value}")

    def set_root_disk_remount(self, ctx: int, device: str, fstype: str | None,
                              options: str | None) -> None:
        """Boot from `device` (a disk added before): libkrun's init mounts it as the root.

        `fstype` None or "auto" lets the guest try every block file system it knows.
        """
        if not self.has("krun_set_root_disk_remount"):
            raise KrunError("krun_set_root_disk_remount", errno.ENOSYS,
                            f"not in this libkrun ({self.path}), so it cannot boot a root disk")
        self._call("krun_set_root_disk_remount", ctx, _b(device),
                   None if fstype is None else _b(fstype),
                   None if options is None else _b(options))

    def add_virtiofs(self, ctx: int, tag: str, path: str, readonly: bool) -> None:
        """A shared directory; read-only needs `krun_add_virtiofs3` (never silently rw)."""
        if readonly:
            self._call("krun_add_virtiofs3", ctx, _b(tag), _b(path), 0, True)
        else:
            self._call("krun_add_virtiofs", ctx, _b(tag), _b(path))

    def set_workdir(self, ctx: int, workdir: str) -> None:
        self._call("krun_set_workdir", ctx, _b(workdir))

    def set_exec(self, ctx: int, exec_path: str, args: Sequence[str], env: Sequence[str]) -> None:
        """`args` are the arguments after the program name; `env` KEY=VALUE, exactly."""
        self._call("krun_set_exec", ctx, _b(exec_path), _strv(args), _strv(env))

    def set_network(self, ctx: int, tsi_features: int, port_map: Sequence[str]) -> None:
        """The guest's only vsock device, explicitly: TSI exactly as `tsi_features` says
        (libkrun's implicit one would forward inet sockets), and the port map, always
        given (no map at all would publish every port the guest listens on)."""
        self._call("krun_disable_implicit_vsock", ctx)
        self._call("krun_add_vsock", ctx, tsi_features)
        self._call("krun_set_port_map", ctx, _strv(port_map))

    def set_rlimits(self, ctx: int, entries: Sequence[str]) -> None:
        """Guest resource limits, `ID=CUR:MAX` each (set by the guest's init)."""
        self._call("krun_set_rlimits", ctx, _strv(entries))

    def map_vsock_port(self, ctx: int, port: int, path: str) -> None:
        """Guest connections to host vsock `port` become connections to the Unix socket
        at `path`, made by libkrun in this process (`krun_add_vsock_port2`, listen false)."""
        self._call("krun_add_vsock_port2", ctx, port, _b(path), False)

    def set_identity(self, ctx: int, uid: int | None, gid: int | None) -> None:
        """The uid/gid libkrun drops to right before the guest starts (gid first)."""
        if gid is not None:
            self._call("krun_setgid", ctx, gid)
        if uid is not None:
            self._call("krun_setuid", ctx, uid)

    def shutdown_eventfd(self, ctx: int) -> int | None:
        """The eventfd that asks the guest to stop in order, if this libkrun has one
        (libkrun 1.19 builds it only for macOS on aarch64: Linux uses msbd.vm.control)."""
        if not self.has("krun_get_shutdown_eventfd"):
            return None
        return self._call("krun_get_shutdown_eventfd", ctx)

    def start_enter(self, ctx: int) -> KrunError:
        """Hand the process to libkrun. It only comes back with the error that stopped it."""
        try:
            ret = self._call("krun_start_enter", ctx)
        except KrunError as exc:
            return exc
        return KrunError("krun_start_enter", 0, f"returned {ret} without starting the VM")


def unshare_network() -> None:
    """Move this process into a new network namespace (needs CAP_SYS_ADMIN); OSError if
    it cannot. A libc call, here because this is the worker's one ctypes module."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(_CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


_CLONE_NEWNET: Final = 0x40000000


def load(configured: str | None, environ: Mapping[str, str] | None = None) -> Krun:
    """The first usable libkrun in lookup order, or `LibraryNotLoadable` naming each try."""
    tried: list[str] = []
    env = os.environ if environ is None else environ
    for source, name in candidates(configured, env):
        try:
            lib = ctypes.CDLL(name)
        except OSError as exc:
            tried.append(f"{name} ({source}): {exc}")
            continue
        krun = Krun(lib, name)
        if missing := krun.missing():
            tried.append(f"{name} ({source}): not a usable libkrun, lacks {', '.join(missing)}")
            continue
        return krun
    raise LibraryNotLoadable("libkrun", tried)


def version_in_name(path: str, soname: str) -> str | None:
    """The version a library's file name says, as distributions install them:
    `/usr/lib64/libkrun.so.1.19.7` for soname `libkrun.so.1` gives "1.19.7"."""
    name = os.path.basename(os.path.realpath(path))
    stem = soname.rsplit(".so", 1)[0] + ".so."
    if not name.startswith(stem):
        return None
    version = name[len(stem):]
    return version if version and all(p.isdigit() for p in version.split(".")) else None


def load_libkrunfw(beside: str | None = None) -> str:
    """Load libkrunfw (the guest kernel libkrun loads by soname) and say where it is, or
    `LibraryNotLoadable`. The dynamic loader's search comes first, then the directory
    of `beside` (a libkrun installed with its libkrunfw next to it)."""
    tried: list[str] = []
    names = list(LIBKRUNFW_SONAMES)
    if beside and os.path.isabs(beside):
        names += [os.path.join(os.path.dirname(beside), n) for n in LIBKRUNFW_SONAMES]
    for name in names:
        try:
            lib = ctypes.CDLL(name)
        except OSError as exc:
            tried.append(f"{name}: {exc}")
            continue
        try:
            address = ctypes.cast(lib["krunfw_get_kernel"], ctypes.c_void_p).value
        except AttributeError:
            address = None
        return _path_of(address) or name
    raise LibraryNotLoadable("libkrunfw", tried)
