"""The daemon's handler table and the method table agree: every method in
`msbd.rpc.methods.METHODS` has exactly one handler in `msbd.daemon.api.Api`, taking
the method's params type and returning its result type, and every handler serves one
method."""

from __future__ import annotations

import inspect
import typing

import pytest

from msbd.daemon.api import Api, handler_name
from msbd.rpc.methods import METHODS


def _handlers() -> dict[str, typing.Any]:
    """Every public function of `Api`: its handlers (a plain one never suspends)."""
    return {name: func for name, func in inspect.getmembers(Api, inspect.isfunction)
            if not name.startswith("_")}


def test_every_method_has_one_handler_and_every_handler_one_method() -> None:
    names = [handler_name(method) for method in METHODS]
    assert len(set(names)) == len(names), "two methods share a verb, so a handler"
    assert sorted(names) == sorted(_handlers())


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_handler_takes_its_methods_params_and_returns_its_result(method: str) -> None:
    func = _handlers()[handler_name(method)]
    hints = typing.get_type_hints(func)
    _self, _caller, params, _ctx = inspect.signature(func).parameters
    assert hints[params] is METHODS[method].params
    assert hints["return"] == METHODS[method].result
