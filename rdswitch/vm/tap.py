"""The tap device and its netlink configuration (vm-switch side).

Netlink calls are blocking; every function here that talks netlink is meant to
run inside ``trio.to_thread.run_sync`` and creates, uses and closes its own
``IPRoute`` in that thread (pyroute2's async API does not run under trio).
The helpers shared with network-setup are in :mod:`rdswitch.netlink`.
"""

from __future__ import annotations

import fcntl
import os
import struct

from pyroute2 import IPRoute

from ..netlink import link_index, loopback_up

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
# The largest TSO packet the tap may hand us: the 16-bit framing carries at
# most 65535 bytes per Ethernet frame, 14 of them the Ethernet header.
MAX_GSO_SIZE = 65000  # below 65535 - 14 with room for how the kernel counts headers


class TapError(RuntimeError):
    pass


def open_tap(name: str, *, vnet_hdr: bool = False, tso: bool = False) -> int:
    """Create tap ``name`` (not persistent: it vanishes when the fd closes); return the non-blocking fd.

    With ``vnet_hdr`` every frame each way carries a virtio_net_hdr: frames we
    write may be 64 KiB TCP segments with a partial checksum, which the kernel
    segments and completes.  With ``tso`` too the kernel may hand us TCP
    segments up to 64 KiB (TSO) with the checksum left to us (we never verify
    it: the host-switch does not either); without it, what we read is whole
    and within the MTU.
    """
    if len(name.encode()) > 15:
        raise TapError(f"interface name {name!r} is longer than 15 bytes")
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        flags = IFF_TAP | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr or tso else 0)
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), flags))
        if tso:
            fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4)
    except OSError as exc:
        os.close(fd)
        raise TapError(f"cannot create tap {name!r}: {exc}") from exc
    return fd


def setup_link(name: str, mac: str, mtu: int, offload: bool = False) -> None:
    """Set MAC and MTU (and the TSO size limit with offload), bring the tap and ``lo`` up."""
    with IPRoute() as ipr:
        loopback_up(ipr)
        idx = _tap_index(ipr, name)
        ipr.link("set", index=idx, address=mac, mtu=mtu)
        if offload:
            ipr.link("set", index=idx, gso_max_size=MAX_GSO_SIZE)
        ipr.link("set", index=idx, state="up")


def _tap_index(ipr: IPRoute, name: str) -> int:
    idx = link_index(ipr, name)
    if idx is None:
        raise TapError(f"tap {name!r} disappeared")
    return idx


def configure_address(name: str, ip: str, prefixlen: int, router: str | None, mtu: int | None) -> None:
    """Replace eth0's IPv4 addresses with ``ip/prefixlen``; default route via ``router``."""
    with IPRoute() as ipr:
        idx = _tap_index(ipr, name)
        if mtu:
            ipr.link("set", index=idx, mtu=mtu)
        current = [(a.get_attr("IFA_ADDRESS"), a["prefixlen"]) for a in ipr.get_addr(index=idx, family=2)]
        for addr, plen in current:
            if (addr, plen) != (ip, prefixlen):
                ipr.addr("del", index=idx, address=addr, prefixlen=plen)
        if (ip, prefixlen) not in current:
            ipr.addr("add", index=idx, address=ip, prefixlen=prefixlen)
        if router:
            ipr.route("replace", dst="0.0.0.0/0", gateway=router, oif=idx)


def flush_addresses(name: str) -> None:
    with IPRoute() as ipr:
        idx = link_index(ipr, name)
        if idx is not None:
            ipr.flush_addr(index=idx, family=2)
