"""Logging setup: one line per event on stderr, with level and context fields.

Context rides in `extra={"ctx": {...}}` and is printed as `key=value` pairs
after the message, e.g. `INFO msbd.supervisor: run ended sandbox=web reason=exited`.
When journald collects stderr (`JOURNAL_STREAM` matches fd 2) the timestamp is
left out, because the journal adds its own.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import Any


class ContextFormatter(logging.Formatter):
    def __init__(self, *, timestamps: bool) -> None:
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s" if timestamps else \
            "%(levelname)s %(name)s: %(message)s"
        super().__init__(fmt)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ctx = getattr(record, "ctx", None)
        if isinstance(ctx, Mapping) and ctx:
            head, sep, tail = line.partition("\n")
            fields = " ".join(f"{k}={_quote(v)}" for k, v in ctx.items())
            line = f"{head} {fields}{sep}{tail}"
        return line


def _quote(value: Any) -> str:
    text = str(value)
    return repr(text) if (not text or any(c.isspace() or c in "\"'=" for c in text)) else text


def journald_is_collecting(environ: Mapping[str, str] | None = None,
                           stderr_fd: int = 2) -> bool:
    """Whether `stderr_fd` is the stream journald reads (`JOURNAL_STREAM` is `dev:inode`).

    Then journald stamps every line itself and log lines need no timestamp.
    """
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep:
        return False
    try:
        st = os.fstat(stderr_fd)
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError):
        return False


def setup_logging(level: str, *, environ: Mapping[str, str] | None = None) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(ContextFormatter(timestamps=not journald_is_collecting(environ)))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiosqlite logs every statement at DEBUG: far too much even for msbd's debug level.
    logging.getLogger("aiosqlite").setLevel(max(logging.INFO, root.level))


def ctx(**fields: Any) -> dict[str, Any]:
    """`log.info("...", extra=ctx(sandbox=name))`: context printed as key=value."""
    return {"ctx": fields}
