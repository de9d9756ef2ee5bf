"""Namespace and veth plumbing over netlink (pyroute2), blocking.

Every function here is meant to run inside one ``trio.to_thread.run_sync``
call and creates, uses and closes its own IPRoute there (pyroute2's async API
does not run under trio); the helpers shared with vm-switch are in
:mod:`rdswitch.netlink`.  Namespaces are the iproute2 kind (a bind mount
under /run/netns), so ``ip netns exec NAME`` finds them.
"""

from __future__ import annotations

import errno
import ipaddress
import os

from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError

from ..netlink import link_index, loopback_up

NETNS_DIR = "/run/netns"


class LinkError(RuntimeError):
    """Setting up the namespace or the veth failed; str() is for the user."""


def netns_path(name: str) -> str:
    return os.path.join(NETNS_DIR, name)


def netns_exists(name: str) -> bool:
    return os.path.exists(netns_path(name))


def delete_link(name: str) -> bool:
    """Delete interface ``name`` in this namespace; True if it existed."""
    with IPRoute() as ipr:
        idx = link_index(ipr, name)
        if idx is None:
            return False
        try:
            ipr.link("del", index=idx)
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:  # vanished meanwhile (e.g. its namespace went away)
                return False
            raise LinkError(f"cannot delete interface {name}: {exc}") from exc
        return True


def create_netns(name: str) -> None:
    if netns_exists(name):
        raise LinkError(f"network namespace {name} already exists")
    try:
        netns.create(name)
    except OSError as exc:
        raise LinkError(f"cannot create network namespace {name}: {exc}") from exc
    if not netns_exists(name):
        raise LinkError(f"cannot create network namespace {name}: {netns_path(name)} did not appear")


def remove_netns(name: str) -> bool:
    """Unmount and remove namespace ``name``; True if it existed."""
    if not netns_exists(name):
        return False
    try:
        netns.remove(name)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise LinkError(f"cannot remove network namespace {name}: {exc}") from exc
    return True


def setup_veth(ns_name: str, host_if: str, ns_if: str, host_addr: ipaddress.IPv4Interface,
               ns_addr: ipaddress.IPv4Interface) -> None:
    """Create the veth pair: ``host_if`` here with ``host_addr``, ``ns_if`` in ``ns_name`` with ``ns_addr``; all up.

    The peer is created directly inside the namespace, so its name never
    clashes with an interface of this namespace.  ``lo`` inside is brought up too.
    """
    try:
        nsfd = os.open(netns_path(ns_name), os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise LinkError(f"cannot open network namespace {ns_name}: {exc}") from exc
    try:
        with IPRoute() as ipr:
            try:
                ipr.link("add", ifname=host_if, kind="veth", peer={"ifname": ns_if, "net_ns_fd": nsfd})
            except NetlinkError as exc:
                raise LinkError(f"cannot create veth pair {host_if}/{ns_if}: {exc}") from exc
            idx = link_index(ipr, host_if)
            if idx is None:
                raise LinkError(f"veth {host_if} vanished right after it was created")
            try:
                ipr.addr("add", index=idx, address=str(host_addr.ip), prefixlen=host_addr.network.prefixlen)
                ipr.link("set", index=idx, state="up")
            except NetlinkError as exc:
                raise LinkError(f"cannot configure {host_if} with {host_addr}: {exc}") from exc
    finally:
        os.close(nsfd)
    with IPRoute(netns=ns_name, flags=0) as nipr:
        try:
            loopback_up(nipr)
            idx = link_index(nipr, ns_if)
            if idx is None:
                raise LinkError(f"veth {ns_if} did not appear in namespace {ns_name}")
            nipr.addr("add", index=idx, address=str(ns_addr.ip), prefixlen=ns_addr.network.prefixlen)
            nipr.link("set", index=idx, state="up")
        except NetlinkError as exc:
            raise LinkError(f"cannot configure {ns_if} in {ns_name} with {ns_addr}: {exc}") from exc


def claims(netns_name: str | None = None) -> list:
    """Every IPv4 route (any table but ``local``) and interface address of this namespace (or ``netns_name``),
    as :class:`~rdswitch.network_setup.collision.Claim`s."""
    import socket

    from .collision import Claim

    out = []
    with (IPRoute(netns=netns_name, flags=0) if netns_name else IPRoute()) as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        for route in ipr.get_routes(family=socket.AF_INET):
            table = route.get_attr("RTA_TABLE") or route["table"]
            dst = route.get_attr("RTA_DST")
            if table == 255 or dst is None or route["dst_len"] == 0:
                continue
            dev = names.get(route.get_attr("RTA_OIF"), "?")
            out.append(Claim(ipaddress.IPv4Network(f"{dst}/{route['dst_len']}", strict=False), dev))
        for addr in ipr.get_addr(family=socket.AF_INET):
            iface = ipaddress.IPv4Interface(f"{addr.get_attr('IFA_ADDRESS')}/{addr['prefixlen']}")
            out.append(Claim(iface.network, names.get(addr["index"], "?"), "address", iface))
    return out
