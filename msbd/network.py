"""A sandbox's network and resource limits: the launch spec's `network`, `ports`, `rlimits`.

Pure data and pure checks, no I/O, shared by the daemon (which checks a spec
and decides who may ask for what), the worker (which turns them into libkrun
calls) and msbctl.

Why the modes are what they are (docs/network.md has the whole story): a
libkrun guest has no network card unless one is added. Its sockets reach the
host only through TSI, libkrun's socket forwarding, where the VMM process
opens the real socket on the guest's behalf, on the host, as the sandbox
owner. TSI cannot be limited by address: a guest with TSI for inet sockets
connects to anything the owner's processes can, the host's loopback
included, and a socket it listens on is bound on the host. So:

- `none` gives the guest no TSI at all (only its own loopback). With
  published ports the guest gets TSI inet sockets, but its VMM runs in a
  network namespace of its own, holding only a loopback: the worker listens on
  the host address and relays each connection to the guest's port inside.
- `egress` is TSI inet in the host's namespace: outbound access, and the
  published ports are libkrun's own port map. Because that also reaches the
  host's loopback, the daemon grants it to administrators only unless a
  setting opens it to everyone.

No mode ever turns on TSI for Unix sockets: a guest must never reach a host
Unix socket (the daemon's own control socket first of all).
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Mapping, Sequence
from typing import Annotated, Final, Literal

import msgspec

from msbd.errors import InvalidParams

MAX_PORTS: Final = 64
# Host ports below this need root to bind (the kernel's default
# `net.ipv4.ip_unprivileged_port_start`): only an administrator publishes them.
FIRST_UNPRIVILEGED_PORT: Final = 1024
DEFAULT_ADDRESS: Final = "127.0.0.1"

# libkrun's TSI feature bits (krun_add_vsock's `tsi_features`).
TSI_NONE: Final = 0
TSI_HIJACK_INET: Final = 1
TSI_HIJACK_UNIX: Final = 2  # never used: documented so that a test can say so


# What rpc.discover and msbctl say about the two fields (docs/network.md says more).
NETWORK_HELP: Final = (
    "'none': no network; only published ports reach the guest. 'egress': the guest's "
    "inet sockets are its owner's sockets on the host: they reach whatever the host "
    "reaches, the host's loopback services and other sandboxes' published ports "
    "included, and every port the guest listens on is bound on the host (on the address "
    "it asks for). Only administrators get 'egress' unless the daemon's `egress` setting "
    "is 'everyone'. Default: the daemon's `default_network` ('none' unless set). No mode "
    "lets a guest reach a host Unix socket.")
PORTS_HELP: Final = (
    "published TCP ports: host clients connect to `address`:`host` (127.0.0.1 unless "
    "given) and reach the guest's port `guest`. A host port below 1024 needs a sandbox of "
    "root's; one another running sandbox publishes is refused at start (-32002).")

RLIMITS_HELP: Final = "guest resource limits by name (nofile, nproc, ...), soft and hard alike"


class Network(enum.StrEnum):
    NONE = "none"
    EGRESS = "egress"


Port = Annotated[int, msgspec.Meta(ge=1, le=65535, description="a TCP port, 1-65535")]
Address = Annotated[str, msgspec.Meta(
    max_length=45, description="the host address to listen on (IPv4 or IPv6 literal)")]


class PortMap(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A published port: host clients connect to `address`:`host` and reach the guest's
    `guest` port. `address` defaults to 127.0.0.1 (network `none` only; with `egress`
    the guest's own listen address is used on the host)."""

    host: Port
    guest: Port
    address: Address | None = None

    @property
    def listen_address(self) -> str:
        return DEFAULT_ADDRESS if self.address is None else self.address

    def label(self) -> str:
        """`HOST:GUEST`, or `ADDRESS:HOST:GUEST` with an explicit address (msbctl's -p)."""
        head = "" if self.address is None else (
            f"[{self.address}]:" if ":" in self.address else f"{self.address}:")
        return f"{head}{self.host}:{self.guest}"


# Guest resource limits by name, as `ulimit` and setrlimit(2) call them, and the
# resource number a Linux guest's init passes to setrlimit (the same on every
# architecture libkrun runs guests on).
RLIMITS: Final = {
    "cpu": 0, "fsize": 1, "data": 2, "stack": 3, "core": 4, "rss": 5, "nproc": 6,
    "nofile": 7, "memlock": 8, "as": 9, "locks": 10, "sigpending": 11, "msgqueue": 12,
    "nice": 13, "rtprio": 14, "rttime": 15,
}
RlimitName = Literal["cpu", "fsize", "data", "stack", "core", "rss", "nproc", "nofile",
                     "memlock", "as", "locks", "sigpending", "msgqueue", "nice", "rtprio",
                     "rttime"]
RlimitValue = Annotated[int, msgspec.Meta(
    ge=0, le=2**63 - 1, description="the limit, soft and hard alike")]


def check_ports(network: Network | None, ports: Sequence[PortMap]) -> None:
    """The rules msgspec's field constraints cannot say; `InvalidParams` names the field.

    `network` None is the daemon's default, which is checked again once known.
    """
    hosts: set[int] = set()
    guests: set[int] = set()
    for i, port in enumerate(ports):
        if port.host in hosts:
            raise InvalidParams(f"host port {port.host} is published twice",
                                field=f"ports[{i}].host")
        if port.guest in guests:
            raise InvalidParams(f"guest port {port.guest} is published twice",
                                field=f"ports[{i}].guest")
        hosts.add(port.host)
        guests.add(port.guest)
        if port.address is not None:
            if network is Network.EGRESS:
                raise InvalidParams(
                    "an address is only for network 'none'; with 'egress' the guest's own "
                    "listen address is used on the host", field=f"ports[{i}].address")
            try:
                ipaddress.ip_address(port.address)
            except ValueError:
                raise InvalidParams(f"{port.address!r} is not an IPv4 or IPv6 address",
                                    field=f"ports[{i}].address") from None


def tsi_features(network: Network, ports: Sequence[PortMap]) -> int:
    """What libkrun forwards: inet sockets for egress or published ports, never Unix ones."""
    return TSI_HIJACK_INET if network is Network.EGRESS or ports else TSI_NONE


def needs_namespace(network: Network, ports: Sequence[PortMap]) -> bool:
    """Whether the VMM gets a network namespace of its own (published ports without egress)."""
    return network is Network.NONE and bool(ports)


def port_map_entries(network: Network, ports: Sequence[PortMap]) -> list[str]:
    """libkrun's port map, `host:guest` each. With egress the host port is the published
    one; in a private namespace each guest port keeps its number (the relay's target)."""
    if network is Network.EGRESS:
        return [f"{p.host}:{p.guest}" for p in ports]
    return [f"{p.guest}:{p.guest}" for p in ports]


def rlimit_entries(rlimits: Mapping[RlimitName, int]) -> list[str]:
    """`ID=CUR:MAX` for libkrun's `krun_set_rlimits` (soft and hard limits alike)."""
    return [f"{RLIMITS[name]}={value}:{value}" for name, value in sorted(rlimits.items())]
