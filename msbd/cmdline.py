"""What a launch spec may put on the guest kernel's command line, where libkrun carries it.

libkrun (1.19, Linux) hands the workload to its guest on the kernel command
line (docs/libkrun.md):

    ... KRUN_INIT=<exec> KRUN_WORKDIR=<workdir> ... "NAME=value" ... -- "arg" "arg" ...

So:

- The line takes printable ASCII only (space to `~`): libkrun's VMM panics
  on anything else when it builds the line, so a tab, a newline or a UTF-8
  character would crash the worker instead of starting the guest.
- Each argument and each `NAME=value` is wrapped in double quotes without
  escaping, and the kernel toggles quoting at every `"`: a `"` inside one
  splits or merges arguments.
- `exec` and `workdir` are not quoted at all: a space splits them.
- The guest's init consumes `KRUN_*` and `MSBD_*` variables itself (the
  workload never sees them), so a spec may not set them.

Pure checks, no I/O: `msbd.model.LaunchSpec.check` calls `check_workload`,
so the daemon refuses such a spec when it is created and the worker refuses
it again when it reads it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Final

from msbd.errors import InvalidParams

RESERVED_ENV_PREFIXES: Final = ("KRUN_", "MSBD_")

_QUOTED_UNSAFE: Final = re.compile(r'[^ !#-~]')  # printable ASCII but '"'
_BARE_UNSAFE: Final = re.compile(r'[^!#-~]')  # ... and no space either
_QUOTED_WHY: Final = ("libkrun passes each argument and NAME=value to the guest on its kernel "
                      "command line in double quotes, without escaping, and that line takes "
                      "printable ASCII only")
_BARE_WHY: Final = ("libkrun passes it to the guest on its kernel command line without quotes, "
                    "and that line takes printable ASCII only and splits at spaces")


def problem(value: str, *, quoted: bool) -> str | None:
    """What in `value` cannot travel on the guest kernel's command line, or None.

    `quoted`: libkrun wraps it in double quotes (arguments, environment), so a
    space is fine there; unquoted (exec, workdir) it is not.
    """
    found = (_QUOTED_UNSAFE if quoted else _BARE_UNSAFE).search(value)
    if found is None:
        return None
    char = found.group()
    if char == '"':
        return 'contains a double quote (")'
    if char == " ":
        return "contains a space"
    if char < " " or char == "\x7f":
        return f"contains the control character {char!r}"
    return f"contains {char!r} (U+{ord(char):04X}), which is not ASCII"


def check_workload(exec_path: str, workdir: str | None, args: Sequence[str],
                   env: Mapping[str, str]) -> None:
    """Raise `InvalidParams` naming the first field that cannot reach the guest, and why."""
    bare = [("exec", exec_path)] + ([("workdir", workdir)] if workdir is not None else [])
    for field, value in bare:
        if found := problem(value, quoted=False):
            raise InvalidParams(f"`{field}` {found}: {_BARE_WHY}", field=field)
    for i, arg in enumerate(args):
        if found := problem(arg, quoted=True):
            raise InvalidParams(f"`args[{i}]` {found}: {_QUOTED_WHY}", field=f"args[{i}]")
    for key, value in env.items():
        if key.startswith(RESERVED_ENV_PREFIXES):
            raise InvalidParams(f"`env.{key}`: names starting with KRUN_ or MSBD_ are reserved "
                                "for the guest's init, which takes them for itself",
                                field=f"env.{key}")
        if found := problem(key, quoted=True) or problem(value, quoted=True):
            raise InvalidParams(f"`env.{key}` {found}: {_QUOTED_WHY}", field=f"env.{key}")
