"""Spec reading in the worker, and msb's `--disk` syntax table against parse_disk_arg."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from workerproc import memfd_with, pipe_with, spec_bytes

from msbd.errors import InvalidParams
from msbd.model import DiskFormat, parse_disk_arg, parse_mount_arg
from msbd.vm import spec

# msb's own cases (its parse_one_disk_arg tests), one row each.
DISK_OK = [
    ("data_abc:/host/data.qcow2:qcow2", "data_abc", "/host/data.qcow2", DiskFormat.QCOW2, False),
    ("seed:/host/seed.raw:raw:ro", "seed", "/host/seed.raw", DiskFormat.RAW, True),
    ("v:/host/v.vmdk:vmdk", "v", "/host/v.vmdk", DiskFormat.VMDK, False),
]
DISK_BAD = [
    ("missing format", "id:/host", "invalid --disk entry, expected id:host:format[:ro]"),
    ("too many fields", "id:/host:raw:ro:extra",
     "invalid --disk entry, expected id:host:format[:ro]"),
    ("empty id", ":/host:raw", "invalid --disk entry with empty id"),
    ("empty host", "id::raw", "invalid --disk entry with empty host path"),
    ("unknown format", "id:/host:bogus", "invalid --disk entry with unknown format 'bogus'"),
    ("rw flag", "id:/host:raw:rw", "invalid --disk entry with unknown flag 'rw' (expected 'ro')"),
    ("RO flag", "id:/host:raw:RO", "invalid --disk entry with unknown flag 'RO' (expected 'ro')"),
    ("no colon", "bad", "invalid --disk entry, expected id:host:format[:ro]"),
]


@pytest.mark.parametrize(("entry", "disk_id", "host", "fmt", "readonly"), DISK_OK)
def test_disk_arg_accepted(entry: str, disk_id: str, host: str, fmt: DiskFormat,
                           readonly: bool) -> None:
    disk = parse_disk_arg(entry)
    assert (disk.id, disk.host, disk.format, disk.readonly) == (disk_id, host, fmt, readonly)


@pytest.mark.parametrize(("entry", "message"), [c[1:] for c in DISK_BAD],
                         ids=[c[0] for c in DISK_BAD])
def test_disk_arg_rejected(entry: str, message: str) -> None:
    with pytest.raises(InvalidParams) as info:
        parse_disk_arg(entry)
    assert str(info.value).startswith(message)
    assert info.value.field == "disks"


def test_one_bad_disk_among_good_ones_rejects_the_lot() -> None:
    base = spec.decode_spec(spec_bytes(name="t", exec="/bin/true", rootfs="/"))
    with pytest.raises(InvalidParams, match="invalid --disk entry"):
        spec.with_overrides(base, disks=["good:/host/g.raw:raw", "bad",
                                         "another:/host/a.qcow2:qcow2:ro"])


def test_overrides_replace_by_id_and_append_the_rest() -> None:
    base = spec.decode_spec(spec_bytes(
        name="t", exec="/bin/true", rootfs="/",
        disks=[{"id": "a", "host": "/a.raw", "format": "raw"},
               {"id": "b", "host": "/b.raw", "format": "raw"}],
        mounts=[{"tag": "m", "host": "/m"}]))
    out = spec.with_overrides(base, disks=["b:/b2.qcow2:qcow2:ro", "c:/c.vmdk:vmdk"],
                              mounts=["m:/m2:ro", "n:/n"], libkrun="/opt/libkrun.so.1")
    assert [(d.id, d.host, d.format, d.readonly) for d in out.disks] == [
        ("a", "/a.raw", DiskFormat.RAW, False), ("b", "/b2.qcow2", DiskFormat.QCOW2, True),
        ("c", "/c.vmdk", DiskFormat.VMDK, False)]
    assert [(m.tag, m.host, m.readonly) for m in out.mounts] == [("m", "/m2", True),
                                                                  ("n", "/n", False)]
    assert out.libkrun == "/opt/libkrun.so.1"


def test_a_disk_override_named_root_conflicts_with_a_root_disk() -> None:
    base = spec.decode_spec(spec_bytes(name="t", exec="/bin/true",
                                       root_disk={"path": "/r.raw", "format": "raw"}))
    with pytest.raises(InvalidParams, match="duplicate disk id 'root'"):
        spec.with_overrides(base, disks=["root:/x.raw:raw"])


def test_mount_arg_strictness() -> None:
    assert parse_mount_arg("tag:/host:ro").readonly
    for bad in ("tag", "tag:/host:rw", ":/host", "tag:", "a:/b:ro:x"):
        with pytest.raises(InvalidParams):
            parse_mount_arg(bad)


@pytest.mark.parametrize(("data", "message"), [
    (b"", "spec is not valid JSON"),
    (b"[]", "invalid spec: Expected `object`, got `array`"),
    (b'{"name": "t", "exec": "/x", "rootfs": "relative"}', "invalid spec: Expected `str` matching"),
    (b'{"name": "t", "exec": "/x", "rootfs": "/", "workdir": "w"}',
     "`workdir` must be an absolute guest path"),
    (b'{"name": "t", "exec": "/x", "rootfs": "/", "heartbeat_interval": 0}',
     "invalid spec: Expected `float` > 0.0"),
    # The worker takes uid, gid and groups together, before it opens any host file.
    (b'{"name": "t", "exec": "/x", "rootfs": "/", "uid": 1000}',
     "`uid` and `gid` must be given together"),
    (b'{"name": "t", "exec": "/x", "rootfs": "/", "gid": 1000}',
     "`uid` and `gid` must be given together"),
    (b'{"name": "t", "exec": "/x", "rootfs": "/", "groups": [1000]}',
     "`groups` needs `uid` and `gid`"),
    (b'{"name": "t", "exec": "/x", "rootfs": "/", "mounts": [{"tag": "p", "host": "/proc"}]}',
     "`mounts[0].host`: /proc is under /proc, which msbd never opens"),
])
def test_decode_spec_rejects(data: bytes, message: str) -> None:
    with pytest.raises(InvalidParams) as info:
        spec.decode_spec(data)
    assert str(info.value).startswith(message)


def test_read_spec_from_memfd_pipe_and_file(tmp_path: Path) -> None:
    big = spec_bytes(name="t", exec="/x", rootfs="/", args=["v" * 60_000] * 4)  # > 1 chunk
    small = spec_bytes(name="t", exec="/x", rootfs="/", args=["v" * 60_000])  # fits a pipe
    for fd, data in ((memfd_with(big), big), (pipe_with(small), small)):
        try:
            assert spec.read_spec_fd(fd) == data
        finally:
            os.close(fd)
    data = big
    path = tmp_path / "spec.json"
    path.write_bytes(data)
    assert spec.read_spec_file(str(path)) == data


def test_guest_env_keeps_the_specs_order() -> None:
    s = spec.decode_spec(b'{"name": "t", "exec": "/x", "rootfs": "/", '
                         b'"env": {"B": "2", "A": "", "C": "x=y"}}')
    assert spec.guest_env(s) == ["B=2", "A=", "C=x=y"]
