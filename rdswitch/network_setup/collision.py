"""Does the veth subnet collide with a network the host already has? (pure)

A veth subnet that overlaps a route or an address of the namespace it joins
(a home LAN on 192.168.1.0/24, a VPN's routes) shadows that network for
everything in the containers' namespace: that is how Rancher Desktop's first
layout broke its users' LANs.  network-setup and the sandbox look before they
create anything: :func:`find_overlap` names what is in the way and
:func:`suggest_free` a subnet of the same size that is not.  The routes and
addresses come in as data (:mod:`rdswitch.network_setup.links` reads them).
"""

from __future__ import annotations

import ipaddress
from typing import Iterable

import attrs

#: Where :func:`suggest_free` looks, in order: the private ranges.
POOLS = tuple(ipaddress.IPv4Network(n) for n in ("192.168.0.0/16", "172.16.0.0/12", "10.0.0.0/8"))


@attrs.frozen
class Claim:
    """A network the host uses: a route's destination, or an interface address's network."""

    network: ipaddress.IPv4Network
    dev: str
    kind: str = "route"  # or "address"
    address: ipaddress.IPv4Interface | None = None

    def __str__(self) -> str:
        if self.kind == "address" and self.address is not None:
            return f"address {self.address} on {self.dev}"
        return f"route {self.network} dev {self.dev}"


def find_overlap(wanted: Iterable[ipaddress.IPv4Network], claims: Iterable[Claim], *,
                 ignore_dev: str | None = None) -> tuple[ipaddress.IPv4Network, Claim] | None:
    """The first (wanted network, claim) that overlap; routes before addresses.

    The default route (a /0) overlaps everything and means nothing here;
    claims on ``ignore_dev`` (a stale veth of ours, removed before the new
    one is made) do not count.
    """
    claims = [c for c in claims if c.network.prefixlen > 0 and c.dev != ignore_dev]
    claims.sort(key=lambda c: c.kind != "route")
    for claim in claims:
        for net in wanted:
            if net.overlaps(claim.network):
                return net, claim
    return None


def suggest_free(wanted: ipaddress.IPv4Network, taken: Iterable[ipaddress.IPv4Network]) -> ipaddress.IPv4Network | None:
    """A subnet as large as ``wanted`` that overlaps none of ``taken``: the next ones after it first, then the
    private ranges from the start; None if every candidate is taken."""
    taken = [t for t in taken if t.prefixlen > 0]
    size = wanted.num_addresses
    first = int(wanted.network_address)
    for pool in POOLS:
        if wanted.prefixlen < pool.prefixlen:
            continue
        start, end = int(pool.network_address), int(pool.broadcast_address) + 1
        count = (end - start) // size
        # begin right after ``wanted`` when it lies in this pool, so the answer stays close to it
        offset = (first - start) // size + 1 if start <= first < end else 0
        for i in range(min(count, 4096)):
            cand = ipaddress.IPv4Network((start + ((offset + i) % count) * size, wanted.prefixlen))
            if cand != wanted and not any(cand.overlaps(t) for t in taken):
                return cand
    return None


def collision_message(what: str, wanted: ipaddress.IPv4Network, claim: Claim,
                      suggestion: ipaddress.IPv4Network | None) -> str:
    """The one line network-setup and the sandbox exit with."""
    text = (f"the veth subnet {wanted} ({what}) overlaps the {claim} already on this host "
            f"(a LAN or a VPN?); its traffic would go into the veth instead")
    if suggestion is not None:
        text += f"; pick a free subnet, e.g. --veth-subnet {suggestion}"
    else:
        text += "; pick a free subnet with --veth-subnet"
    return text


def veth_conflict(what: str, wanted: Iterable[ipaddress.IPv4Network], claims: Iterable[Claim], *,
                  ignore_dev: str | None = None, also_taken: Iterable[ipaddress.IPv4Network] = ()) -> str | None:
    """The line to refuse with when ``wanted`` overlaps one of ``claims`` (None: free).

    ``also_taken`` (the virtual subnet, say) is kept out of the suggestion too.
    """
    claims = list(claims)
    hit = find_overlap(wanted, claims, ignore_dev=ignore_dev)
    if hit is None:
        return None
    net, claim = hit
    taken = [c.network for c in claims if c.dev != ignore_dev] + list(also_taken)
    return collision_message(what, net, claim, suggest_free(net, taken))
