"""The OpenRPC document is generated from the method table and resolves completely."""

from __future__ import annotations

from typing import Any

import msgspec

from msbd.errors import RpcCode
from msbd.rpc.methods import METHODS, NOTIFICATIONS
from msbd.rpc.openrpc import openrpc_document

DOC = openrpc_document("1.2.3")


def resolve(schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        prefix = "#/components/schemas/"
        assert schema["$ref"].startswith(prefix)
        schema = DOC["components"]["schemas"][schema["$ref"][len(prefix):]]
    return schema


def all_refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [r for k, v in node.items() for r in ([v] if k == "$ref" else all_refs(v))]
    if isinstance(node, list):
        return [r for v in node for r in all_refs(v)]
    return []


def test_every_method_is_documented_by_name() -> None:
    assert DOC["info"]["version"] == "1.2.3"
    assert [m["name"] for m in DOC["methods"]] == list(METHODS)
    for method in DOC["methods"]:
        assert method["paramStructure"] == "by-name"
        assert method["summary"] == METHODS[method["name"]].summary
        fields = METHODS[method["name"]].params.__struct_fields__
        assert [p["name"] for p in method["params"]] == list(fields)


def test_every_reference_resolves() -> None:
    refs = all_refs(DOC)
    assert refs
    for ref in refs:
        section, name = ref.removeprefix("#/components/").split("/")
        assert name in DOC["components"][section], ref


def test_required_flags_and_constraints() -> None:
    create = next(m for m in DOC["methods"] if m["name"] == "sandbox.create")
    params = {p["name"]: p for p in create["params"]}
    assert params["name"]["required"] and params["exec"]["required"]
    assert not params["vcpus"]["required"]
    assert params["vcpus"]["schema"]["minimum"] == 1
    assert params["vcpus"]["schema"]["maximum"] == 255
    mounts = resolve(params["mounts"]["schema"]["items"])
    assert "tag" in mounts["required"]


def test_notifications_and_errors() -> None:
    assert [n["name"] for n in DOC["x-notifications"]] == list(NOTIFICATIONS)
    event = DOC["x-notifications"][0]
    assert resolve(event["params"][0]["schema"])["title"] == "Event"
    codes = {e["code"] for e in DOC["components"]["errors"].values()}
    assert codes == {int(c) for c in RpcCode}


def test_document_is_json() -> None:
    assert msgspec.json.decode(msgspec.json.encode(DOC)) == DOC
