"""The pure checks behind "what is opened as whom": image headers, mount tables, /proc names."""

from __future__ import annotations

import struct

import pytest

from msbd.model import DiskFormat, under_proc
from msbd.vm.hostfiles import fdinfo_mount_id, mount_types
from msbd.vm.images import MAX_DESCRIPTOR, Problem, check

# --- qcow2 headers, built field by field ------------------------------------------------

DATA_FILE_BIT = 1 << 2
EXT_BACKING_FORMAT, EXT_DATA_FILE = 0xE2792ACA, 0x44415441


def qcow2(*, version: int = 3, backing: bytes | None = None, backing_offset: int | None = None,
          backing_size: int | None = None, cluster_bits: int = 16, incompatible: int = 0,
          header_length: int = 104, extensions: tuple[tuple[int, bytes], ...] = (),
          magic: bytes = b"QFI\xfb") -> bytes:
    """A qcow2 image's first cluster: header, extensions (then the end marker), backing name."""
    ext = b"".join(struct.pack(">II", kind, len(data)) + data + b"\0" * (-len(data) % 8)
                   for kind, data in extensions) + struct.pack(">II", 0, 0)
    if version != 3:
        ext = b""  # version 2 has no extensions
    base = header_length if version == 3 else 72
    offset = backing_offset if backing_offset is not None else (
        base + len(ext) if backing is not None else 0)
    size = backing_size if backing_size is not None else len(backing or b"")
    header = magic + struct.pack(">IQIIQIIQQIIQ", version, offset, size, cluster_bits,
                                 1 << 20, 0, 1, 0x30000, 0x10000, 1, 0, 0)
    if version == 3:
        header += struct.pack(">QQQII", incompatible, 0, 0, 4, header_length)
        header += b"\0" * (header_length - len(header)) + ext
    image = header + (backing or b"")
    return image + b"\0" * ((1 << cluster_bits) - len(image))


NAMES = "libkrun would open it"  # marks a problem that names another file

QCOW2_CASES = [
    ("plain v3", qcow2(), None),
    ("plain v2", qcow2(version=2), None),
    ("backing-format extension only", qcow2(extensions=((EXT_BACKING_FORMAT, b"raw"),)), None),
    ("v3 backing", qcow2(backing=b"/etc/shadow"),
     ("a qcow2 image naming the backing file '/etc/shadow'", NAMES)),
    ("v2 relative backing", qcow2(version=2, backing=b"97"),
     ("a qcow2 image naming the backing file '97'", NAMES)),
    ("backing offset with size 0", qcow2(backing_offset=512, backing_size=0),
     ("a qcow2 image naming the backing file ''", NAMES)),
    ("backing past the first cluster", qcow2(cluster_bits=9, backing_offset=600, backing_size=4),
     ("a qcow2 image naming a backing file (at offset 600, outside its first cluster)", NAMES)),
    ("control characters shown escaped", qcow2(backing=b"/x\ny\x1b"),
     ("a qcow2 image naming the backing file '/x\\ny\\x1b'", NAMES)),
    ("data file bit and extension",
     qcow2(incompatible=DATA_FILE_BIT, extensions=((EXT_BACKING_FORMAT, b"raw"),
                                                   (EXT_DATA_FILE, b"/dev/sda"))),
     ("a qcow2 image naming the external data file '/dev/sda'", NAMES)),
    ("data file extension without the bit", qcow2(extensions=((EXT_DATA_FILE, b"d.raw"),)),
     ("a qcow2 image naming the external data file 'd.raw'", NAMES)),
    ("data file bit without a name", qcow2(incompatible=DATA_FILE_BIT),
     ("a qcow2 image whose data is in an external data file", NAMES)),
    ("not qcow2", b"\0" * 4096,
     ("not a qcow2 image (it does not start with a qcow2 header)", None)),
    ("too short", b"QFI\xfb\0\0\0\3",
     ("not a qcow2 image (it does not start with a qcow2 header)", None)),
    ("version 1", qcow2(version=1), ("a qcow2 image of version 1, which libkrun cannot read",
                                     None)),
    ("v3 cut short", qcow2()[:80], ("a qcow2 image of version 3, which libkrun cannot read",
                                    None)),
    ("cluster_bits too large", qcow2(cluster_bits=9)[:72].replace(
        struct.pack(">I", 9), struct.pack(">I", 30), 1) + b"\0" * 512,
     ("not a valid qcow2 image (cluster_bits 30)", None)),
    ("v3 header too short", qcow2(header_length=104)[:100] + struct.pack(">I", 96)
     + b"\0" * 4000, ("not a valid qcow2 image (header_length 96)", None)),
]


def expected(case: tuple[str, str | None] | None) -> Problem | None:
    if case is None:
        return None
    return Problem(case[0], case[1] is NAMES)


@pytest.mark.parametrize(("head", "problem"), [c[1:] for c in QCOW2_CASES],
                         ids=[c[0] for c in QCOW2_CASES])
def test_qcow2(head: bytes, problem: tuple[str, str | None] | None) -> None:
    assert check(DiskFormat.QCOW2, head, len(head)) == expected(problem)


def test_raw_is_never_interpreted() -> None:
    assert check(DiskFormat.RAW, qcow2(backing=b"/etc/shadow"), 65536) is None


# --- vmdk descriptors and sparse headers ---------------------------------------------------


def descriptor(*lines: str) -> bytes:
    return ("# Disk DescriptorFile\nversion=1\nCID=12345678\n"
            + "".join(f"{line}\n" for line in lines)).encode()


def sparse(embedded: bytes | None) -> bytes:
    """A KDMV sparse extent header, with `embedded` as its descriptor at sector 1."""
    offset, sectors = (1, 20) if embedded is not None else (0, 0)
    header = b"KDMV" + struct.pack("<IIQQQQ", 1, 3, 2048, 128, offset, sectors)
    image = header + b"\0" * (512 - len(header))
    return image + (embedded or b"") + b"\0" * 10240


VMDK_CASES = [
    ("zero extents only", descriptor('parentCID=ffffffff', 'createType="monolithicFlat"',
                                     "RW 2048 ZERO", "NOACCESS 100"), None),
    ("flat extent", descriptor('RW 2048 FLAT "disk-flat.vmdk" 0'),
     ("a vmdk descriptor naming the extent file 'disk-flat.vmdk'", NAMES)),
    ("second extent names a file", descriptor("RW 10 ZERO", 'RDONLY 10 FLAT "/etc/shadow"'),
     ("a vmdk descriptor naming the extent file '/etc/shadow'", NAMES)),
    ("unquoted file", descriptor("RW 2048 FLAT disk.raw 0"),
     ("a vmdk descriptor naming the extent file 'disk.raw'", NAMES)),
    ("no-access extent with a file", descriptor('NOACCESS 10 FLAT "x"'),
     ("a vmdk descriptor naming the extent file 'x'", NAMES)),
    ("comment lines are no extents", descriptor('# RW 2048 FLAT "x"', "RW 1 ZERO"), None),
    ("parent file", descriptor('parentFileNameHint="base.vmdk"'),
     ("a vmdk descriptor naming the parent image 'base.vmdk'", NAMES)),
    ("delta image", descriptor("parentCID=1a2b3c4d"),
     ("a vmdk descriptor of a delta image (parentCID=1a2b3c4d): it needs a parent image",
      NAMES)),
    ("sparse naming itself", sparse(descriptor('RW 2048 SPARSE "disk.vmdk"')),
     ("a sparse vmdk naming the extent file 'disk.vmdk'", NAMES)),
    ("sparse without a descriptor", sparse(None),
     ("a sparse vmdk extent, which libkrun cannot read", None)),
    ("COWD", b"COWD" + b"\0" * 2044, ("an old (COWD) sparse vmdk, which libkrun cannot read",
                                       None)),
    ("not text", b"\xff\xfe" + b"\0" * 100,
     ("not a vmdk descriptor (it is not UTF-8 text)", None)),
]


@pytest.mark.parametrize(("head", "problem"), [c[1:] for c in VMDK_CASES],
                         ids=[c[0] for c in VMDK_CASES])
def test_vmdk(head: bytes, problem: tuple[str, str | None] | None) -> None:
    assert check(DiskFormat.VMDK, head, len(head)) == expected(problem)


def test_a_vmdk_too_large_for_a_descriptor() -> None:
    head = descriptor("RW 1 ZERO")
    assert check(DiskFormat.VMDK, head, MAX_DESCRIPTOR + 1) == Problem(
        f"a vmdk of {MAX_DESCRIPTOR + 1} bytes, too large for a descriptor (libkrun reads "
        f"at most {MAX_DESCRIPTOR})", False)


# --- where an opened file lies ------------------------------------------------------------

MOUNTINFO = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
40 27 0:35 / /tmp rw,nosuid master:3 unbindable - tmpfs tmpfs rw,size=1024k
41 27 0:36 / /odd\\040name rw - fuse.sshfs host:/x rw
garbage line
"""


def test_mount_types() -> None:
    assert mount_types(MOUNTINFO) == {22: "proc", 27: "ext4", 40: "tmpfs", 41: "fuse.sshfs"}


@pytest.mark.parametrize(("fdinfo", "mount_id"), [
    ("pos:\t0\nflags:\t02100000\nmnt_id:\t27\nino:\t1234\n", 27),
    ("pos:\t0\nflags:\t02100000\n", None),
    ("mnt_id:\tx\n", None),
])
def test_fdinfo_mount_id(fdinfo: str, mount_id: int | None) -> None:
    assert fdinfo_mount_id(fdinfo) == mount_id


@pytest.mark.parametrize(("path", "refused"), [
    ("/proc", True), ("/proc/", True), ("/proc/1/root/etc/shadow", True),
    ("//proc/self/fd/3", True), ("/./proc/self", True), ("/tmp/../proc/1", True),
    ("/proc/../etc/hostname", False), ("/procfs/x", False), ("/srv/proc", False),
    ("/tmp/proc/1", False),
])
def test_under_proc(path: str, refused: bool) -> None:
    assert under_proc(path) is refused
