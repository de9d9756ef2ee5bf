"""rdswitch.netlink: the pyroute2 helpers vm-switch and network-setup share."""

from __future__ import annotations

import trio

from rdswitch import netlink


class FakeIPRoute:
    """Just the calls the helpers make, over a name -> index table."""

    def __init__(self, links: dict[str, int]):
        self.links = links
        self.calls: list[tuple] = []

    def link_lookup(self, ifname):
        return [self.links[ifname]] if ifname in self.links else []

    def link(self, command, **kw):
        self.calls.append((command, kw))


def test_link_index():
    ipr = FakeIPRoute({"lo": 1, "eth0": 7})
    assert netlink.link_index(ipr, "eth0") == 7
    assert netlink.link_index(ipr, "lo") == 1
    assert netlink.link_index(ipr, "eth1") is None


def test_loopback_up_sets_lo_up_only_if_present():
    ipr = FakeIPRoute({"lo": 1, "eth0": 7})
    netlink.loopback_up(ipr)
    assert ipr.calls == [("set", {"index": 1, "state": "up"})]
    ipr = FakeIPRoute({})
    netlink.loopback_up(ipr)
    assert ipr.calls == []


def test_link_exists_in_a_worker_thread():
    """The way vm-switch calls it: the IPRoute lives and dies in one to_thread call."""

    async def main():
        return (await trio.to_thread.run_sync(netlink.link_exists, "lo"),
                await trio.to_thread.run_sync(netlink.link_exists, "rdsw-no-such0"))

    assert trio.run(main) == (True, False)
