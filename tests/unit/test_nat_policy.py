"""The NAT's destination policy: where a VM flow may go."""

import ipaddress

from rdswitch.config import NetConfig
from rdswitch.stack.nat import NatPolicy

NET = NetConfig()


def ip(s):
    return ipaddress.IPv4Address(s).packed


def test_nat_table_and_refusals():
    p = NatPolicy(NET, allow_outbound=(ipaddress.IPv4Network("127.0.0.0/8"), ipaddress.IPv4Network("198.18.0.0/15")))
    assert p.destination(ip("192.168.127.254")) == ("127.0.0.1", "")
    assert p.destination(ip("198.18.7.2")) == ("198.18.7.2", "")
    assert p.destination(ip("10.1.2.3")) == (None, "outbound-denied")
    assert p.destination(ip("127.0.0.53")) == (None, "loopback")  # loopback only through .254
    assert p.destination(ip("169.254.169.254")) == (None, "link-local")
    assert p.destination(ip("192.168.127.77")) == (None, "virtual-subnet")
    for bcast in ("255.255.255.255", "192.168.127.255", "224.0.0.251", "0.0.0.0"):
        assert p.destination(ip(bcast)) == (None, "not-unicast")


def test_link_local_opt_in_and_default_allows_all():
    p = NatPolicy(NET, allow_link_local=True)
    assert p.destination(ip("169.254.1.1")) == ("169.254.1.1", "")
    assert p.destination(ip("93.184.216.34")) == ("93.184.216.34", "")


def test_from_args_without_allow_outbound_allows_everything():
    # host-switch started with no --allow-outbound used to die with a traceback here
    import argparse

    from rdswitch.host.nat import add_nat_arguments

    p = argparse.ArgumentParser()
    add_nat_arguments(p)
    policy = NatPolicy.from_args(p.parse_args([]), NetConfig())
    assert policy.allow_outbound == (ipaddress.IPv4Network("0.0.0.0/0"),)
    assert policy.destination(bytes([198, 18, 0, 1])) == ("198.18.0.1", "")
