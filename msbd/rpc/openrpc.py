"""The OpenRPC document of the control API, generated from the method table and its types.

Nothing here is written by hand: methods, params (by name, one content
descriptor per struct field), results and the `event` notification come from
`msbd.rpc.methods`; schemas from msgspec; error codes from `RpcCode`.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

from msbd.errors import RpcCode
from msbd.rpc.methods import METHODS, NOTIFICATIONS

OPENRPC_VERSION: Final = "1.3.2"
_REF: Final = "#/components/schemas/{name}"
_STANDARD: Final = frozenset({RpcCode.PARSE_ERROR, RpcCode.INVALID_REQUEST,
                              RpcCode.METHOD_NOT_FOUND, RpcCode.INVALID_PARAMS,
                              RpcCode.INTERNAL_ERROR})


def _error_message(code: RpcCode) -> str:
    return code.name.replace("_", " ").lower()


def _descriptors(ref: dict[str, Any], schemas: dict[str, Any]) -> list[dict[str, Any]]:
    """One ContentDescriptor per field of the params struct `ref` points at."""
    struct = schemas[ref["$ref"].rsplit("/", 1)[-1]]
    required = set(struct.get("required", ()))
    return [{"name": name, "required": name in required, "schema": schema}
            for name, schema in struct.get("properties", {}).items()]


def openrpc_document(version: str) -> dict[str, Any]:
    """The OpenRPC document for `rpc.discover`; `version` is msbd's own version."""
    specs = list(METHODS.values())
    notes = list(NOTIFICATIONS.items())
    types = ([m.params for m in specs] + [m.result for m in specs]
             + [kind for _, kind in notes])
    refs, schemas = msgspec.json.schema_components(types, ref_template=_REF)
    n = len(specs)
    param_refs, result_refs, note_refs = refs[:n], refs[n:2 * n], refs[2 * n:]
    app_errors = [code for code in RpcCode if code not in _STANDARD]
    errors = {code.name: {"code": int(code), "message": _error_message(code)} for code in RpcCode}
    error_refs = [{"$ref": f"#/components/errors/{code.name}"} for code in app_errors]
    methods = [{
        "name": spec.name,
        "summary": spec.summary,
        "paramStructure": "by-name",
        "params": _descriptors(param_ref, schemas),
        "result": {"name": "result", "schema": result_ref},
        "errors": error_refs,
    } for spec, param_ref, result_ref in zip(specs, param_refs, result_refs, strict=True)]
    notifications = [{
        "name": name,
        "summary": (kind.__doc__ or "").strip().splitlines()[0] if kind.__doc__ else "",
        "paramStructure": "by-name",
        "params": _descriptors(ref, schemas),
    } for (name, kind), ref in zip(notes, note_refs, strict=True)]
    return {
        "openrpc": OPENRPC_VERSION,
        "info": {
            "title": "msbd",
            "version": version,
            "description": "Control API of msbd, the microVM sandbox supervisor: newline-"
                           "delimited JSON-RPC 2.0 over a Unix socket, params by name.",
        },
        "methods": methods,
        "x-notifications": notifications,
        "components": {"schemas": schemas, "errors": errors},
    }
