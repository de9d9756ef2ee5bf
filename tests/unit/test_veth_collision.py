"""The veth subnet's collision check (pure): what overlaps, what to suggest instead."""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st

from rdswitch.network_setup.collision import Claim, find_overlap, suggest_free, veth_conflict

N = ipaddress.IPv4Network
VETH = N("192.168.143.0/24")


def test_a_route_on_the_veth_subnet_is_named_with_a_free_suggestion():
    claims = [Claim(N("0.0.0.0/0"), "eth0"), Claim(N("192.168.143.0/24"), "dummy0"),
              Claim(N("192.168.144.0/24"), "wlan0"),
              Claim(N("192.168.143.0/24"), "dummy0", "address", ipaddress.IPv4Interface("192.168.143.7/24"))]
    line = veth_conflict("veth-rd-ns 192.168.143.1/24", [VETH], claims, also_taken=[N("192.168.145.0/24")])
    assert "overlaps the route 192.168.143.0/24 dev dummy0" in line
    assert line.endswith("e.g. --veth-subnet 192.168.146.0/24")  # .144 is a LAN, .145 the virtual subnet
    assert "\n" not in line


def test_an_address_alone_counts_and_the_default_route_does_not():
    addr = Claim(N("192.168.143.0/24"), "eth1", "address", ipaddress.IPv4Interface("192.168.143.9/24"))
    assert find_overlap([VETH], [addr]) == (VETH, addr)
    assert str(addr) == "address 192.168.143.9/24 on eth1"
    assert find_overlap([VETH], [Claim(N("0.0.0.0/0"), "eth0")]) is None


def test_a_larger_or_smaller_overlapping_network_collides():
    assert find_overlap([VETH], [Claim(N("192.168.0.0/16"), "tun0")]) is not None  # a VPN's wide route
    assert find_overlap([VETH], [Claim(N("192.168.143.128/25"), "tun0")]) is not None
    assert find_overlap([VETH], [Claim(N("192.168.142.0/24"), "eth0")]) is None


def test_our_own_stale_veth_is_ignored():
    stale = Claim(N("192.168.143.0/24"), "veth-rd-wsl")
    assert veth_conflict("x", [VETH], [stale], ignore_dev="veth-rd-wsl") is None
    assert veth_conflict("x", [VETH], [stale], ignore_dev="other") is not None


def test_suggestion_when_everything_near_is_taken():
    # all of 192.168.0.0/16 taken: the next pool
    assert suggest_free(VETH, [N("192.168.0.0/16")]) == N("172.16.0.0/24")
    assert suggest_free(VETH, [N("0.0.0.0/1"), N("128.0.0.0/1")]) is None


_nets = st.builds(lambda a, p: N((a, p), strict=False), st.integers(0, 2**32 - 1), st.integers(8, 30))


@given(st.lists(_nets, max_size=20), st.integers(16, 30))
def test_a_suggestion_never_overlaps_what_is_taken(taken, prefix):
    wanted = N(("192.168.143.0", prefix), strict=False)
    got = suggest_free(wanted, taken)
    if got is not None:
        assert got.prefixlen == wanted.prefixlen and got != wanted
        assert not any(got.overlaps(t) for t in taken)
