"""The launch spec as the worker reads it: from fd 96 or a file, plus `--disk`/`--mount`
overrides."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Sequence
from typing import Final, TypeVar

import msgspec

from msbd.errors import InvalidParams
from msbd.model import Disk, Mount, WorkerSpec, parse_disk_arg, parse_mount_arg

MAX_SPEC_BYTES: Final = 64 * 1024 * 1024
_DECODER: Final = msgspec.json.Decoder(WorkerSpec)
_CHUNK: Final = 1 << 16
_T = TypeVar("_T", Disk, Mount)


def read_spec_fd(fd: int) -> bytes:
    """All of fd 96: a memfd/regular file from offset 0, or a pipe until EOF."""
    if stat.S_ISREG(os.fstat(fd).st_mode):
        chunks: list[bytes] = []
        offset = 0
        while chunk := os.pread(fd, _CHUNK, offset):
            offset += len(chunk)
            _limit(offset)
            chunks.append(chunk)
        return b"".join(chunks)
    os.set_blocking(fd, True)
    data = bytearray()
    while chunk := os.read(fd, _CHUNK):
        data += chunk
        _limit(len(data))
    return bytes(data)


def read_spec_file(path: str) -> bytes:
    with open(path, "rb") as f:
        data = f.read(MAX_SPEC_BYTES + 1)
    _limit(len(data))
    return data


def _limit(size: int) -> None:
    if size > MAX_SPEC_BYTES:
        raise InvalidParams(f"the spec is larger than {MAX_SPEC_BYTES} bytes")


def decode_spec(data: bytes) -> WorkerSpec:
    """Decode and check a spec; any problem is one `InvalidParams`."""
    try:
        spec = _DECODER.decode(data)
    except msgspec.ValidationError as exc:
        raise InvalidParams(f"invalid spec: {exc}") from None
    except msgspec.DecodeError as exc:
        raise InvalidParams(f"spec is not valid JSON: {exc}") from None
    spec.check()
    return spec


def with_overrides(spec: WorkerSpec, *, disks: Sequence[str] = (), mounts: Sequence[str] = (),
                   libkrun: str | None = None) -> WorkerSpec:
    """Apply `--disk id:host:format[:ro]` / `--mount tag:host[:ro]` entries (msb's syntax).

    An entry with the id (tag) of one in the spec replaces it; others are added.
    The result is checked again.
    """
    new_disks = _merge(spec.disks, [parse_disk_arg(d) for d in disks], lambda d: d.id)
    new_mounts = _merge(spec.mounts, [parse_mount_arg(m) for m in mounts], lambda m: m.tag)
    changed = msgspec.structs.replace(
        spec, disks=new_disks, mounts=new_mounts,
        libkrun=libkrun if libkrun is not None else spec.libkrun)
    if libkrun is not None and not libkrun.startswith("/"):
        raise InvalidParams("--libkrun must be an absolute path", field="libkrun")
    changed.check()
    return changed


def _merge(old: Sequence[_T], new: Sequence[_T], key: Callable[[_T], str]) -> list[_T]:
    out = list(old)
    where = {key(item): i for i, item in enumerate(out)}
    for item in new:
        if key(item) in where:
            out[where[key(item)]] = item
        else:
            where[key(item)] = len(out)
            out.append(item)
    return out


def guest_env(spec: WorkerSpec) -> list[str]:
    """The spec's environment, as KEY=VALUE entries (the worker adds msbd.vm.control's)."""
    return [f"{key}={value}" for key, value in spec.env.items()]
