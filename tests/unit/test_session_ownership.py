"""A session owns every task that serves its VM: ending it ends them all at once.

An in-process host-switch (no sockets, no namespaces) with a VM built from our
own codecs: a DNS-over-TCP query waits on an upstream that never answers and
an API request waits for the rest of its body when the VM's connection ends.
"""

from __future__ import annotations

import argparse
import struct

import dnslib
import trio

from rdswitch.config import NetConfig
from rdswitch.host import dns_server, switch_host
from rdswitch.host.api import ApiServer, create_app
from rdswitch.host.forwarder import Forwarder
from rdswitch.stack.nat import NatPolicy
from tests.vmpeer import MemoryLink, VmPeer

NET = NetConfig()
GW = NET.gateway_ip.packed


def task_names() -> list[str]:
    out = []

    def walk(task) -> None:
        out.append(task.name)
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                walk(child)

    walk(trio.lowlevel.current_root_task())
    return out


def serving(names: list[str]) -> int:
    return sum(1 for n in names if n.endswith("NatShell._serve_local"))


def make_dns(upstream_called: trio.Event, upstream_cancelled: trio.Event):
    p = argparse.ArgumentParser()
    dns_server.add_arguments(p)
    dns = dns_server.from_args(p.parse_args(["--dns-upstream", "127.0.0.1:9"]), NET)

    async def never_answers(data, upstreams, **kw):
        upstream_called.set()
        try:
            await trio.sleep_forever()
        finally:
            upstream_cancelled.set()

    dns._forward = never_answers
    return dns


async def ending_a_session_ends_its_dns_and_api_tasks_at_once():
    upstream_called, upstream_cancelled = trio.Event(), trio.Event()
    dns = make_dns(upstream_called, upstream_cancelled)
    hs = switch_host.build(NET, NatPolicy(NET), dns=dns)
    api = ApiServer(create_app(hs, Forwarder(hs), dns))
    hs.nat.add_local_service(53, dns.serve_stream)
    hs.nat.add_local_service(80, api.connection)
    link = MemoryLink()
    vm = VmPeer(link, NET)
    session_over = trio.Event()

    async def run_session():
        await hs.run_session(link)
        session_over.set()

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_session)
            nursery.start_soon(vm.run)

            dns_conn = vm.connect(GW, 53)
            await vm.wait_established(dns_conn)
            query = dnslib.DNSRecord.question("example.org").pack()
            vm.write(dns_conn, struct.pack("!H", len(query)) + query)
            await upstream_called.wait()  # the query waits on the upstream

            api_conn = vm.connect(GW, 80)
            await vm.wait_established(api_conn)
            vm.write(api_conn, b"POST /services/forwarder/expose HTTP/1.1\r\nHost: api\r\n"
                               b"Content-Length: 100\r\n\r\n{\"local\": ")  # the rest of the body never comes
            while serving(task_names()) < 2 or not any("hypercorn" in n for n in task_names()):
                await trio.sleep(0)  # ok-sleep: a checkpoint while polling for both handlers (bounded by fail_after)
            assert len(hs.sessions) == 1

            link.to_host.close()  # the VM's connection ends
            await session_over.wait()
            names = task_names()
            assert serving(names) == 0, names
            assert not any("hypercorn" in n or "serve_stream" in n for n in names), names
            assert upstream_cancelled.is_set()
            assert hs.sessions == {} and hs.nat.core.sessions == {}
            nursery.cancel_scope.cancel()


def test_ending_a_session_ends_its_dns_and_api_tasks_at_once():
    trio.run(ending_a_session_ends_its_dns_and_api_tasks_at_once)
