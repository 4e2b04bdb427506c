"""What a disk image's own bytes say it needs from the host: the check that keeps libkrun
from following an image to another file.

libkrun's image library opens whatever file a qcow2 header names (a backing
file, an external data file) or a vmdk descriptor names (extent files,
a parent), as libkrun and with no check of its own, taking a relative name
against the directory of the name the image was opened by. The worker hands
libkrun `/proc/self/fd/N`, so a relative name would even land on another of
the worker's fds. An image that names any other file is therefore refused
before libkrun sees it. `check` is a pure function of the image's first
bytes and its size, so every rule below is a table test.

qcow2 (big-endian header, as qemu documents it): magic `QFI\\xfb`; version at
4 (2 or 3); `backing_file_offset` (u64 at 8) and `backing_file_size` (u32 at
16): a backing file is named whenever the offset is not 0 (libkrun's library
follows it even with size 0); `cluster_bits` at 20. Version 3 adds
`incompatible_features` (u64 at 72, bit 2: the guest data lives in an external
data file) and header extensions from `header_length` (u32 at 100) to the end
of the first cluster: u32 type, u32 length, data padded to 8 bytes, type 0
ends the list, type 0x44415441 ("DATA") is the data file's name.

vmdk: a text descriptor (`key=value` lines and extent lines
`RW|RDONLY|NOACCESS <sectors> <type> "<file>" [<offset>]`); or a sparse
extent starting with `KDMV` whose little-endian header has the embedded
descriptor's offset and size in 512-byte sectors (u64 at 28 and 36); or an
old `COWD` sparse extent. libkrun's library reads only text descriptors with
FLAT (file) and ZERO extents, so every vmdk holding data names a file and is
refused: vmdk cannot be made safe by handing libkrun an open file. Only a
descriptor whose extents are all ZERO or NOACCESS passes.
"""

from __future__ import annotations

from typing import Final, Literal, NamedTuple

from msbd.model import DiskFormat

MAX_DESCRIPTOR: Final = 2 * 1024 * 1024
"""libkrun's library reads a vmdk descriptor of at most 2 MiB; a qcow2 cluster is at most that."""
HEAD_BYTES: Final = MAX_DESCRIPTOR + 1
"""How many of an image's first bytes `check` needs (one more, to tell "larger")."""

QCOW2_MAGIC: Final = b"QFI\xfb"
_QCOW2_V2_HEADER: Final = 72
_QCOW2_V3_HEADER: Final = 104
_DATA_FILE_FEATURE: Final = 1 << 2
_EXT_END: Final = 0
_EXT_DATA_FILE: Final = 0x44415441
_MIN_CLUSTER_BITS, _MAX_CLUSTER_BITS = 9, 21

VMDK_SPARSE_MAGIC: Final = b"KDMV"
VMDK_COWD_MAGIC: Final = b"COWD"
_SECTOR: Final = 512
_EXTENT_ACCESS: Final = frozenset({"RW", "RDONLY", "NOACCESS"})
_NO_PARENT: Final = "ffffffff"


class Problem(NamedTuple):
    """Why an image is refused. `description` follows "<path> is "; `names_file` says
    whether the image names another host file (that libkrun would open itself)."""

    description: str
    names_file: bool


def check(fmt: DiskFormat, head: bytes, size: int) -> Problem | None:
    """None if libkrun can be given this image without it opening any other file.

    `head` is the image's first bytes (at least `HEAD_BYTES` of them, or all of
    a smaller image); `size` its size in bytes.
    """
    match fmt:
        case DiskFormat.RAW:
            return None  # libkrun reads a raw image as it is: nothing in it is interpreted
        case DiskFormat.QCOW2:
            return _qcow2(head)
        case DiskFormat.VMDK:
            return _vmdk(head, size)


def _shown(name: bytes | str) -> str:
    """A file name for a one-line message: quoted, control characters escaped."""
    text = name.decode("utf-8", "backslashreplace") if isinstance(name, bytes) else name
    return "'" + "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text) + "'"


_Order = Literal["big", "little"]


def _u32(data: bytes, at: int, order: _Order = "big") -> int:
    return int.from_bytes(data[at:at + 4], order)


def _u64(data: bytes, at: int, order: _Order = "big") -> int:
    return int.from_bytes(data[at:at + 8], order)


def _qcow2(head: bytes) -> Problem | None:
    if len(head) < _QCOW2_V2_HEADER or head[:4] != QCOW2_MAGIC:
        return Problem("not a qcow2 image (it does not start with a qcow2 header)", False)
    version = _u32(head, 4)
    if version not in (2, 3) or (version == 3 and len(head) < _QCOW2_V3_HEADER):
        return Problem(f"a qcow2 image of version {version}, which libkrun cannot read", False)
    cluster_bits = _u32(head, 20)
    if not _MIN_CLUSTER_BITS <= cluster_bits <= _MAX_CLUSTER_BITS:
        return Problem(f"not a valid qcow2 image (cluster_bits {cluster_bits})", False)
    first_cluster = head[:1 << cluster_bits]
    backing_offset, backing_size = _u64(head, 8), _u32(head, 16)
    if backing_offset:
        end = backing_offset + backing_size
        if end > len(first_cluster):
            return Problem(f"a qcow2 image naming a backing file (at offset {backing_offset}, "
                           "outside its first cluster)", True)
        name = _shown(first_cluster[backing_offset:end])
        return Problem(f"a qcow2 image naming the backing file {name}", True)
    if version == 2:
        return None
    header_length = _u32(head, 100)
    if header_length < _QCOW2_V3_HEADER:
        return Problem(f"not a valid qcow2 image (header_length {header_length})", False)
    data_file = _qcow2_data_file(first_cluster, header_length)
    if data_file is not None:
        return Problem(f"a qcow2 image naming the external data file {_shown(data_file)}", True)
    if _u64(head, 72) & _DATA_FILE_FEATURE:
        return Problem("a qcow2 image whose data is in an external data file", True)
    return None


def _qcow2_data_file(cluster: bytes, at: int) -> bytes | None:
    """The name in a version 3 header's "external data file" extension, if there is one."""
    while at + 8 <= len(cluster):
        kind, length = _u32(cluster, at), _u32(cluster, at + 4)
        if kind == _EXT_END:
            return None
        if kind == _EXT_DATA_FILE:
            return cluster[at + 8:at + 8 + length]
        at += 8 + (length + 7) // 8 * 8
    return None


def _vmdk(head: bytes, size: int) -> Problem | None:
    if head[:4] == VMDK_SPARSE_MAGIC:
        offset, length = _u64(head, 28, "little") * _SECTOR, _u64(head, 36, "little") * _SECTOR
        embedded = head[offset:offset + length].split(b"\0", 1)[0] if offset else b""
        found = _descriptor_problem(embedded.decode("utf-8", "replace"), sparse=True)
        return found or Problem("a sparse vmdk extent, which libkrun cannot read", False)
    if head[:4] == VMDK_COWD_MAGIC:
        return Problem("an old (COWD) sparse vmdk, which libkrun cannot read", False)
    if size > MAX_DESCRIPTOR:
        return Problem(f"a vmdk of {size} bytes, too large for a descriptor (libkrun reads "
                       f"at most {MAX_DESCRIPTOR})", False)
    try:
        text = head[:size].decode("utf-8")
    except UnicodeDecodeError:
        return Problem("not a vmdk descriptor (it is not UTF-8 text)", False)
    return _descriptor_problem(text, sparse=False)


def _descriptor_problem(text: str, *, sparse: bool) -> Problem | None:
    """The first thing in a vmdk descriptor that names or needs another file."""
    what = "a sparse vmdk" if sparse else "a vmdk descriptor"
    for raw in text.split("\n"):
        line = raw.strip()
        words = line.split()
        if not words or line.startswith("#"):
            continue
        if words[0] in _EXTENT_ACCESS:
            name = _extent_file(line, words)
            if name is not None:
                return Problem(f"{what} naming the extent file {_shown(name)}", True)
            continue
        key, _, value = line.partition("=")
        key, value = key.strip(), value.strip().strip('"')
        if key == "parentFileNameHint":
            return Problem(f"{what} naming the parent image {_shown(value)}", True)
        if key == "parentCID" and value.lower() != _NO_PARENT:
            return Problem(f"{what} of a delta image (parentCID={value}): it needs a parent "
                           "image", True)
    return None


def _extent_file(line: str, words: list[str]) -> str | None:
    """The file an extent line names: the quoted field, else a fourth word, else none."""
    if '"' in line:
        return line.split('"', 2)[1]
    return words[3] if len(words) >= 4 else None
