"""Who may give a sandbox which network: the daemon's side of a spec's `network` and `ports`.

The shape of those fields is checked when a spec is decoded (msbd.network);
what is checked here depends on who asks and on the daemon's settings, and
is checked twice: when the sandbox is created and again at every start, so a
setting changed since creation holds at the moment of use.

- A spec without `network` gets the daemon's `default_network`, written into
  the record at creation, so the record always says what the sandbox gets.
- `egress` gives the guest the host's network as its owner, the host's
  loopback included (docs/network.md), so only administrators get it unless
  the `egress` setting is "everyone".
- A host port below 1024 is published by root's sandboxes only: the worker
  binds it with the owner's rights, and this says so before any launch.
"""

from __future__ import annotations

import msgspec

from msbd.config import Settings
from msbd.daemon.access import Caller
from msbd.errors import PermissionDenied
from msbd.model import LaunchSpec
from msbd.network import FIRST_UNPRIVILEGED_PORT, Network, check_ports


def default_network(settings: Settings) -> Network:
    return Network(settings.default_network)


def with_network(spec: LaunchSpec, settings: Settings) -> LaunchSpec:
    """`spec` with its network decided: its own, or the default if it has none. Never
    raises (a launch of a record made before networks existed uses it too)."""
    if spec.network is not None:
        return spec
    return msgspec.structs.replace(spec, network=default_network(settings))


def admit(spec: LaunchSpec, caller: Caller, *, settings: Settings,
          daemon_uid: int) -> LaunchSpec:
    """A new spec with its network decided and checked: its ports against that network
    (`InvalidParams`), and whether `caller` may have it (`PermissionDenied`)."""
    decided = with_network(spec, settings)
    if spec.network is None:  # checked against its own network when it was decoded
        check_ports(decided.network, decided.ports)
    check_network(decided, caller, settings=settings, daemon_uid=daemon_uid)
    return decided


def check_network(spec: LaunchSpec, caller: Caller, *, settings: Settings,
                  daemon_uid: int) -> None:
    """`PermissionDenied` naming the field if `caller` may not launch `spec`'s network."""
    network = spec.network if spec.network is not None else default_network(settings)
    if (network is Network.EGRESS and settings.egress != "everyone"
            and not caller.is_admin(daemon_uid)):
        raise PermissionDenied(
            "network 'egress' reaches the host's own services (its loopback included), so "
            "this daemon grants it to administrators only (setting `egress`)",
            data={"field": "network"})
    if caller.uid == 0:
        return
    for i, port in enumerate(spec.ports):
        if port.host < FIRST_UNPRIVILEGED_PORT:
            raise PermissionDenied(
                f"host port {port.host} is below {FIRST_UNPRIVILEGED_PORT}: only root's "
                "sandboxes publish those", data={"field": f"ports[{i}].host"})
