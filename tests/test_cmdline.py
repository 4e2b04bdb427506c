"""What a launch spec may put on libkrun's guest kernel command line (msbd.cmdline), as tables."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from msbd import cmdline
from msbd.errors import InvalidParams
from msbd.model import MAX_ARGS, MAX_ENV, LaunchSpec

QUOTED_WHY = ("libkrun passes each argument and NAME=value to the guest on its kernel command "
              "line in double quotes, without escaping, and that line takes printable ASCII only")
BARE_WHY = ("libkrun passes it to the guest on its kernel command line without quotes, and "
            "that line takes printable ASCII only and splits at spaces")


def spec(**fields: Any) -> LaunchSpec:
    base: dict[str, Any] = {"name": "t", "rootfs": "/srv/root", "exec": "/bin/sh"}
    return msgspec.convert(base | fields, type=LaunchSpec)


@pytest.mark.parametrize("fields", [
    {"args": ["-c", "echo 'a  b' $HOME; exit 8", "", " ", "~!#$%&'()*+,-./:;<=>?@[\\]^_`{|}"]},
    {"env": {"A": "x y", "EMPTY": "", "PATH": "/bin:/usr/bin", "Q": "it's", "K_RUN": "1",
             "MSBD": "not a prefix", "krun_x": "lower case is not reserved"}},
    {"exec": "/opt/app-1.2/bin/run_it", "workdir": "/srv/a+b"},
    {"args": ["x"] * MAX_ARGS, "env": {f"V{i}": "v" for i in range(MAX_ENV)}},
])
def test_accepted(fields: dict[str, Any]) -> None:
    spec(**fields).check()


@pytest.mark.parametrize(("fields", "field", "problem"), [
    ({"args": ["ok", 'say "hi"']}, "args[1]", 'contains a double quote (")'),
    ({"args": ["a\nb"]}, "args[0]", "contains the control character '\\n'"),
    ({"args": ["\t"]}, "args[0]", "contains the control character '\\t'"),
    ({"args": ["\x7f"]}, "args[0]", "contains the control character '\\x7f'"),
    ({"args": ["naïve"]}, "args[0]", "contains 'ï' (U+00EF), which is not ASCII"),
    ({"args": ["\u00a0"]}, "args[0]", "contains '\\xa0' (U+00A0), which is not ASCII"),
    ({"env": {"A": '"'}}, "env.A", 'contains a double quote (")'),
    ({"env": {"A": "line\r"}}, "env.A", "contains the control character '\\r'"),
    ({"env": {"A": "€"}}, "env.A", "contains '€' (U+20AC), which is not ASCII"),
    ({"exec": "/my app/run"}, "exec", "contains a space"),
    ({"exec": '/bin/"x"'}, "exec", 'contains a double quote (")'),
    ({"workdir": "/w\tx"}, "workdir", "contains the control character '\\t'"),
    ({"workdir": "/données"}, "workdir", "contains 'é' (U+00E9), which is not ASCII"),
])
def test_refused_with_the_field_and_why(fields: dict[str, Any], field: str,
                                        problem: str) -> None:
    with pytest.raises(InvalidParams) as info:
        spec(**fields).check()
    why = BARE_WHY if field in ("exec", "workdir") else QUOTED_WHY
    assert str(info.value) == f"`{field}` {problem}: {why}"
    assert info.value.field == field


@pytest.mark.parametrize("key", ["KRUN_INIT", "KRUN_BLOCK_ROOT_DEVICE", "MSBD_STOP_GRACE",
                                 "MSBD_CONTROL_PORT", "MSBD_"])
def test_the_inits_own_variables_are_refused(key: str) -> None:
    with pytest.raises(InvalidParams) as info:
        spec(env={"A": "1", key: "x"}).check()
    assert str(info.value) == (f"`env.{key}`: names starting with KRUN_ or MSBD_ are reserved "
                               "for the guest's init, which takes them for itself")
    assert info.value.field == f"env.{key}"


def test_a_key_the_pattern_would_refuse_is_refused_here_too() -> None:
    """A LaunchSpec built in Python skips msgspec's patterns; the command line rule holds."""
    with pytest.raises(InvalidParams, match=r"^`env.A\"B` contains a double quote"):
        cmdline.check_workload("/bin/sh", None, [], {'A"B': "v"})
