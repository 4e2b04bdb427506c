"""systemd/msbd.service, msbd.socket and msbd.sysusers: systemd's own checker, then our choices.

`systemd-analyze verify` (systemd 252) returns 0 for unknown keys and bad
values and only warns on stderr, so a unit passes here only when verify exits 0
and prints nothing at all; the negative tests prove a broken copy is caught.
verify also wants ExecStart's binary to exist: the copies under test point it
at a stub, and that is the only line changed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from msbd.config import Settings, default_paths
from msbd.daemon import activation, systemd
from msbd.daemon.stopping import KILL_MARGIN

REPO = Path(__file__).resolve().parent.parent
UNITS = REPO / "systemd"
SERVICE = UNITS / "msbd.service"
SOCKET = UNITS / "msbd.socket"
SYSUSERS = UNITS / "msbd.sysusers"
EXEC_START = "ExecStart=/usr/bin/msbd serve"

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (Debian package `systemd`)",
)

Unit = dict[str, dict[str, list[str]]]


def parse_unit(text: str) -> Unit:
    """Sections → key → every value in order (keys like DeviceAllow= repeat)."""
    unit: Unit = {}
    section: dict[str, list[str]] | None = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = unit.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert sep and section is not None, f"line {number} is not key=value in a section: {raw!r}"
        assert not value.endswith("\\"), f"line {number}: continuation lines are not parsed here"
        section.setdefault(key.strip(), []).append(value.strip())
    return unit


def one(unit: Unit, section: str, key: str) -> str:
    values = unit.get(section, {}).get(key)
    assert values is not None, f"[{section}] {key}= is missing"
    assert len(values) == 1, f"[{section}] {key}= is set {len(values)} times: {values}"
    return values[0]


def seconds(value: str) -> float:
    """A systemd time span as seconds (the units used in these files)."""
    total = 0.0
    scale = {"ms": 0.001, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600, "": 1}
    for number, suffix in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * scale[suffix]
    return total


@pytest.fixture
def unit_dir(tmp_path: Path) -> Path:
    """Copies of both units; the service's ExecStart points at an executable stub."""
    stub = tmp_path / "bin" / "msbd"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    service = SERVICE.read_text()
    assert service.count(EXEC_START) == 1, f"expected exactly one `{EXEC_START}` line"
    (tmp_path / "msbd.service").write_text(service.replace(EXEC_START, f"ExecStart={stub} serve"))
    shutil.copy(SOCKET, tmp_path / "msbd.socket")
    return tmp_path


def verify(unit_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", "verify", "--man=no",
         str(unit_dir / "msbd.service"), str(unit_dir / "msbd.socket")],
        capture_output=True, text=True, timeout=60, check=False,
    )


def edit(path: Path, old: str, new: str) -> None:
    """Replace the one whole line `old` (not its mentions in comments)."""
    lines = path.read_text().splitlines(keepends=True)
    hits = [i for i, line in enumerate(lines) if line.rstrip("\n") == old]
    assert len(hits) == 1, f"{old!r} should be exactly one line of {path.name}"
    lines[hits[0]] = new + "\n"
    path.write_text("".join(lines))


def test_units_pass_systemd_analyze_verify(unit_dir: Path) -> None:
    result = verify(unit_dir)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


@pytest.mark.parametrize(
    ("unit", "old", "new", "complaint"),
    [
        ("msbd.service", "KillMode=mixed", "KilMode=mixed", "Unknown key"),
        ("msbd.service", "Type=notify", "Type=notifyy", "Failed to parse service type"),
        ("msbd.service", "ProtectSystem=strict", "ProtectSystem=strictest", "Failed to parse"),
        ("msbd.service", "[Service]", "[Servic]", "Unknown section"),
        ("msbd.socket", "SocketMode=0660", "SocketMode=0669", "Failed to parse"),
        ("msbd.socket", "RemoveOnStop=yes", "RemoveOnStop=maybe", "Failed to parse"),
    ],
)
def test_verify_reports_a_broken_unit(unit_dir: Path, unit: str, old: str, new: str,
                                      complaint: str) -> None:
    edit(unit_dir / unit, old, new)
    result = verify(unit_dir)
    assert complaint in result.stderr, result.stderr


def test_verify_fails_when_the_binary_is_missing(unit_dir: Path) -> None:
    (unit_dir / "bin" / "msbd").unlink()
    result = verify(unit_dir)
    assert result.returncode != 0
    assert "is not executable" in result.stderr, result.stderr


def test_service_directives() -> None:
    unit = parse_unit(SERVICE.read_text())
    expected = {
        ("Unit", "Requires"): "msbd.socket",
        ("Unit", "After"): "msbd.socket",
        ("Service", "Type"): "notify",
        ("Service", "NotifyAccess"): "main",
        ("Service", "ExecStart"): "/usr/bin/msbd serve",
        ("Service", "Restart"): "on-failure",
        ("Service", "KillMode"): "mixed",
        ("Service", "OOMPolicy"): "continue",
        ("Service", "StateDirectory"): "msbd",
        ("Service", "RuntimeDirectory"): "msbd",
        ("Service", "RuntimeDirectoryPreserve"): "yes",
        ("Service", "UMask"): "0077",
        ("Service", "DevicePolicy"): "closed",
        ("Service", "ProtectSystem"): "strict",
        ("Service", "ProtectHome"): "read-only",
        ("Service", "PrivateTmp"): "yes",
        ("Service", "NoNewPrivileges"): "yes",
        ("Service", "LockPersonality"): "yes",
        ("Service", "RestrictNamespaces"): "net",
        ("Service", "ProtectKernelModules"): "yes",
        ("Service", "ProtectKernelLogs"): "yes",
        ("Service", "ProtectControlGroups"): "yes",
        ("Service", "ProtectClock"): "yes",
        ("Service", "RestrictAddressFamilies"): "AF_UNIX AF_INET AF_INET6",
        ("Service", "SystemCallFilter"): "@system-service",
        ("Service", "SystemCallArchitectures"): "native",
        ("Install", "WantedBy"): "multi-user.target",
        ("Install", "Also"): "msbd.socket",
    }
    actual = {(section, key): one(unit, section, key) for section, key in expected}
    assert actual == expected
    assert unit["Service"]["DeviceAllow"] == ["/dev/kvm rw", "/dev/net/tun rw"]
    # The daemon's loop (for urgent work) and database threads take a real-time priority by
    # default (`realtime_loop`): RestrictRealtime= would refuse it, and they would run without.
    assert Settings().realtime_loop
    assert "RestrictRealtime" not in unit["Service"]
    # Secrets never go in a unit file: `systemctl show` prints it to everyone.
    for assignment in unit["Service"].get("Environment", []):
        assert not re.search(r"(?i)secret|token|password|key", assignment), assignment


def test_service_timing_fits_the_daemon() -> None:
    service = parse_unit(SERVICE.read_text())["Service"]
    watchdog = seconds(one({"Service": service}, "Service", "WatchdogSec"))
    stop = seconds(one({"Service": service}, "Service", "TimeoutStopSec"))
    assert watchdog == 30
    # msbd pings at half the period; systemd's value must survive the round trip.
    assert systemd.watchdog_interval({"WATCHDOG_USEC": str(int(watchdog * 1e6))}, 1) == 15
    # On SIGTERM msbd lets in-flight calls finish (shutdown_timeout), then stops
    # every sandbox (stop_timeout, then its own SIGKILL) and writes the final
    # state, all before systemd SIGKILLs what is left: keep a 5 s margin.
    defaults = Settings()
    assert defaults.shutdown_timeout + defaults.stop_timeout + KILL_MARGIN + 5 <= stop


def test_units_agree_with_the_daemon_defaults() -> None:
    """A root msbd started by hand uses the same socket and state dir as the units."""
    service = parse_unit(SERVICE.read_text())
    socket_path = one(parse_unit(SOCKET.read_text()), "Socket", "ListenStream")
    state_dir = "/var/lib/" + one(service, "Service", "StateDirectory")
    assert default_paths(uid=0, environ={}) == (socket_path, state_dir)


def test_service_limits_fit_a_thousand_sandboxes() -> None:
    service = parse_unit(SERVICE.read_text())
    nofile = one(service, "Service", "LimitNOFILE")
    tasks = one(service, "Service", "TasksMax")
    # ~5 fds per sandbox in msbd, plus 1,024 clients and slack.
    assert int(nofile.split(":")[-1]) >= 1000 * 5 + 1024
    # ~15 tasks per small sandbox (Python threads, vCPUs, device threads).
    assert tasks == "infinity" or int(tasks) >= 1000 * 15


def test_socket_directives() -> None:
    unit = parse_unit(SOCKET.read_text())
    expected = {
        ("Socket", "ListenStream"): "/run/msbd/msbd.sock",
        ("Socket", "SocketMode"): "0660",
        ("Socket", "SocketGroup"): "msbd",
        ("Socket", "Accept"): "no",
        ("Socket", "RemoveOnStop"): "yes",
        # The name msbd looks for among the fds it is passed.
        ("Socket", "FileDescriptorName"): activation.DEFAULT_FD_NAME,
        ("Install", "WantedBy"): "sockets.target",
    }
    actual = {(section, key): one(unit, section, key) for section, key in expected}
    assert actual == expected


def test_runtime_directory_is_the_socket_directory() -> None:
    service = parse_unit(SERVICE.read_text())
    socket_unit = parse_unit(SOCKET.read_text())
    socket_dir = Path(one(socket_unit, "Socket", "ListenStream")).parent
    assert socket_dir == Path("/run") / one(service, "Service", "RuntimeDirectory")
    # Otherwise stopping the service would delete the socket msbd.socket listens on.
    assert one(service, "Service", "RuntimeDirectoryPreserve") == "yes"


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None,
                    reason="systemd-sysusers is not installed (Debian package `systemd`)")
def test_sysusers_creates_the_socket_group(tmp_path: Path) -> None:
    result = subprocess.run(
        ["systemd-sysusers", f"--root={tmp_path}", "--dry-run", str(SYSUSERS)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr
    group = one(parse_unit(SOCKET.read_text()), "Socket", "SocketGroup")
    assert f"Creating group '{group}'" in result.stdout + result.stderr


def test_security_report_is_printed(unit_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Informational: `systemd-analyze security`'s exposure score (run with -s to see it)."""
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager",
         str(unit_dir / "msbd.service")],
        capture_output=True, text=True, timeout=60, check=False,
    )
    overall = [line for line in result.stdout.splitlines() if "Overall exposure level" in line]
    assert overall, result.stdout + result.stderr
    with capsys.disabled():
        print(f"\n{overall[0].lstrip('→ ').strip()}")
