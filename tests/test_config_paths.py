"""Where the daemon keeps its socket and state by default, and which MSBD_ variables are
settings."""

from __future__ import annotations

import pwd
from pathlib import Path

import pytest

from msbd.config import default_paths, load_settings
from msbd.errors import ConfigError


def _unused_uid() -> int:
    uid = 64170
    while True:
        try:
            pwd.getpwuid(uid)
        except KeyError:
            return uid
        uid += 1


@pytest.mark.parametrize(("environ", "want"), [
    ({"XDG_RUNTIME_DIR": "/run/user/1000", "HOME": "/home/a"},
     ("/run/user/1000/msbd/msbd.sock", "/home/a/.local/state/msbd")),
    ({"XDG_RUNTIME_DIR": "/run/user/1000", "XDG_STATE_HOME": "/s", "HOME": "/home/a"},
     ("/run/user/1000/msbd/msbd.sock", "/s/msbd")),
])
def test_a_user_with_a_home(environ: dict[str, str], want: tuple[str, str]) -> None:
    assert default_paths(uid=1000, environ=environ) == want


def test_root_uses_the_system_paths() -> None:
    assert default_paths(uid=0, environ={}) == ("/run/msbd/msbd.sock", "/var/lib/msbd")


def test_no_home_and_no_passwd_entry_is_not_an_error() -> None:
    uid = _unused_uid()
    assert default_paths(uid=uid, environ={}) == (f"/tmp/msbd-{uid}/msbd/msbd.sock",
                                                  f"/tmp/msbd-{uid}/msbd/state")


def test_no_home_falls_back_to_the_passwd_entry() -> None:
    nobody = pwd.getpwnam("nobody")
    state = default_paths(uid=nobody.pw_uid, environ={})[1]
    assert state == f"{nobody.pw_dir}/.local/state/msbd"


def test_the_tools_variables_are_not_settings(tmp_path: Path) -> None:
    """`make libkrun`'s cache, the real-VM tests' library and the nested lane's marker share
    the MSBD_ prefix; a daemon started where they are set must not take them for typos."""
    env = {"MSBD_CACHE": str(tmp_path), "MSBD_TEST_LIBKRUN": "/x/libkrun.so.1",
           "MSBD_NESTED_KVM": "1", "MSBD_MAX_SANDBOXES_PER_USER": "7", "HOME": str(tmp_path)}
    assert load_settings(environ=env).max_sandboxes_per_user == 7
    with pytest.raises(ConfigError, match="MSBD_MAX_SANDBOXEZ"):
        load_settings(environ={**env, "MSBD_MAX_SANDBOXEZ": "1"})
