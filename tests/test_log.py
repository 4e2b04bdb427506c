"""The daemon's log lines (msbd.log): what the bench, the tests and operators read.

One line per record: `[timestamp ]LEVEL logger: message key=value ...`, a value
quoted (Python repr) when it is empty or holds a space, a quote or `=`; a
traceback after the first line; the timestamp exactly as logging's default
(`%Y-%m-%d %H:%M:%S,mmm`, local time) leading the line when asked for.
"""

from __future__ import annotations

import logging
import sys

import pytest

from msbd.log import ContextFormatter, ctx


def record(msg: str, *, created: float | None = None, fields: dict[str, object] | None = None,
           exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            exc_info = sys.exc_info()
    rec = logging.LogRecord("msbd.supervisor", logging.INFO, __file__, 1, msg, None, exc_info)
    if created is not None:
        rec.created = created
        rec.msecs = (created - int(created)) * 1000
    if fields is not None:
        rec.ctx = fields
    return rec


def test_fields_follow_the_message_quoted_only_when_they_must_be() -> None:
    fields = ctx(sandbox="web", reason="idle_timeout", exit_code=0, signal=None,
                 empty="", spaced="two words", eq="a=b", quote="it's", tab="a\tb")["ctx"]
    line = ContextFormatter(timestamps=False).format(record("run ended", fields=fields))
    assert line == ("INFO msbd.supervisor: run ended sandbox=web reason=idle_timeout "
                    "exit_code=0 signal=None empty='' spaced='two words' eq='a=b' "
                    "quote=\"it's\" tab='a\\tb'")


def test_no_fields_no_trailing_space_and_a_traceback_after_the_first_line() -> None:
    fmt = ContextFormatter(timestamps=False)
    assert fmt.format(record("plain")) == "INFO msbd.supervisor: plain"
    lines = fmt.format(record("failed", fields={"sandbox": "a"}, exc=True)).splitlines()
    assert lines[0] == "INFO msbd.supervisor: failed sandbox=a"
    assert lines[1] == "Traceback (most recent call last):"
    assert lines[-1] == "ValueError: boom"


@pytest.mark.parametrize("created", [1_796_100_000.0, 1_796_100_000.999, 1_796_103_600.5])
def test_the_timestamp_leads_and_is_loggings_own(created: float) -> None:
    stamp = logging.Formatter("%(asctime)s").format(record("m", created=created))
    line = ContextFormatter(timestamps=True).format(record("m", created=created,
                                                           fields={"sandbox": "a"}))
    assert line == f"{stamp} INFO msbd.supervisor: m sandbox=a"
