"""The Windows path without Windows: hvsock URLs and service ids, the registry's candidates (a fake
registry), the handshake over a fake transport among several VMs, and the data-session gate.

Nothing here opens a Hyper-V socket (there is none on Linux); the transport is
trio's in-memory streams and the registry an object with winreg's calls.
"""

from __future__ import annotations

import functools
import logging

import pytest
import trio
import trio.testing

from rdswitch.aio.links import describe_hvsock_peer
from rdswitch.config import READY, SIGNATURE, ConfigError, NetConfig
from rdswitch.handshake import find_vm, hvsock_guid, hvsock_port, refusal, signal_ready
from rdswitch.host import defaults, switch_host
from rdswitch.host.__main__ import PeerGate, admit_session, handshake, serve_listener
from rdswitch.host.compute_systems import (
    COMPUTE_SYSTEM_KEY,
    RegistryCandidates,
    RegistryComputeSystems,
    candidate_urls,
)
from rdswitch.stack.nat import NatPolicy
from rdswitch.urls import HV_GUID_WILDCARD, parse_url, peer_identity
from tests.vmpeer import MemoryLink

VM_A = "0f9a3c4e-1b2d-4e5f-8a9b-0c1d2e3f4a5b"
VM_B = "6e2c7d1a-9b8f-4a3e-b2c1-d0e9f8a7b6c5"
WSL = "a1b2c3d4-e5f6-4789-8abc-def012345678"
GONE = "deadbeef-0000-4000-8000-000000000001"


# ---------------------------------------------------------------- service ids


@pytest.mark.parametrize("port,guid", [
    (0, "00000000-facb-11e6-bd58-64006a7986d3"),
    (6656, "00001a00-facb-11e6-bd58-64006a7986d3"),
    (6669, "00001a0d-facb-11e6-bd58-64006a7986d3"),
    (0xFFFFFFFF, "ffffffff-facb-11e6-bd58-64006a7986d3"),
])
def test_port_to_service_id_and_back(port, guid):
    assert hvsock_guid(port) == guid
    assert hvsock_port(guid) == port
    assert hvsock_port(guid.upper()) == port  # Windows spells GUIDs in upper case
    assert hvsock_port("{" + guid.upper() + "}") == port  # and in braces


def test_every_port_round_trips():
    for port in list(range(0, 70000, 997)) + [2**31, 2**32 - 2]:
        assert hvsock_port(hvsock_guid(port)) == port


@pytest.mark.parametrize("bad", [-1, 2**32, "6669", True, 1.5])
def test_port_out_of_range(bad):
    with pytest.raises(ValueError):
        hvsock_guid(bad)


@pytest.mark.parametrize("bad", [
    "00001a0d-facb-11e6-bd58-64006a7986d4",  # another template
    "00001a0d-0000-0000-0000-000000000000",
    "not a guid",
    "00001a0d-facb-11e6-bd58-64006a7986",
    "",
])
def test_service_id_that_is_no_vsock_port(bad):
    with pytest.raises(ValueError):
        hvsock_port(bad)


# ---------------------------------------------------------------- URLs


def test_hvsock_urls():
    ep = parse_url(f"hvsock://{VM_A.upper()}:6669")
    assert (ep.scheme, ep.vm_id, ep.port) == ("hvsock", VM_A, 6669)
    assert ep.sockaddr() == (VM_A, "00001a0d-facb-11e6-bd58-64006a7986d3")
    assert str(ep) == f"hvsock://{VM_A}:6669"
    assert parse_url(f"hvsock://{{{VM_A}}}:6669").vm_id == VM_A
    listen = parse_url("hvsock://:6656")
    assert listen.vm_id is None and str(listen) == "hvsock://:6656"
    assert listen.sockaddr(listening=True) == (HV_GUID_WILDCARD, hvsock_guid(6656))
    assert parse_url(f"hvsock://{HV_GUID_WILDCARD}:1").vm_id is None
    with pytest.raises(ConfigError, match="no VM id"):
        listen.sockaddr()
    assert ep.proto == 1  # HV_PROTOCOL_RAW


@pytest.mark.parametrize("url,msg", [
    ("hvsock://6669", "expected hvsock://VMID:PORT"),
    ("hvsock://wsl:6669", "is not a GUID"),
    (f"hvsock://{VM_A}:x", "not a number"),
    (f"hvsock://{VM_A}:4294967296", "must be 0..4294967295"),
])
def test_bad_hvsock_urls(url, msg):
    with pytest.raises(ConfigError, match=msg):
        parse_url(url)


def test_hvsock_needs_af_hyperv(monkeypatch):
    import socket

    monkeypatch.delattr(socket, "AF_HYPERV", raising=False)
    with pytest.raises(ConfigError, match="AF_HYPERV"):
        parse_url(f"hvsock://{VM_A}:6669").family


def test_peer_identity():
    assert peer_identity("vsock://3:6669") == peer_identity("vsock://3:1025") == "vsock:3"
    assert peer_identity(f"hvsock://{VM_A.upper()}:6669") == f"hvsock:{VM_A}"
    assert peer_identity("vsock://:6656") is None  # a listening URL names no VM
    assert peer_identity("hvsock://:6656") is None
    for url in ("unix:///tmp/x.sock", "tcp://127.0.0.1:1", "fd://3", "memory", "?"):
        assert peer_identity(url) is None


def test_describe_an_accepted_hvsock_peer():
    # Python gives an AF_HYPERV address as (vm_id, service_id) strings
    assert describe_hvsock_peer((VM_A.upper(), hvsock_guid(1234).upper()), "x") == f"hvsock://{VM_A}:1234"
    assert describe_hvsock_peer((VM_A, "11111111-2222-3333-4444-555555555555"), "x") == f"hvsock://{VM_A}:0"
    assert describe_hvsock_peer(("junk", "junk"), "fallback") == "fallback"
    assert describe_hvsock_peer(None, "fallback") == "fallback"


# ---------------------------------------------------------------- the registry


class FakeWinreg:
    """winreg's four calls over a dict {key path: [subkey names]}; ``on_enum`` runs before each EnumKey."""

    HKEY_LOCAL_MACHINE = object()

    def __init__(self, keys: dict[str, list[str]]):
        self.keys = keys
        self.open_handles = 0
        self.on_enum = None

    def OpenKey(self, root, path):
        assert root is self.HKEY_LOCAL_MACHINE
        if path not in self.keys:
            raise FileNotFoundError(2, "The system cannot find the file specified")
        self.open_handles += 1
        return path

    def EnumKey(self, handle, index):
        if self.on_enum is not None:
            self.on_enum(index)
        subkeys = self.keys.get(handle)
        if subkeys is None:
            raise OSError(1018, "Illegal operation attempted on a registry key that has been marked for deletion")
        if index >= len(subkeys):
            raise OSError(259, "No more data is available")
        return subkeys[index]

    def CloseKey(self, handle):
        self.open_handles -= 1


def test_registry_lists_the_running_compute_systems():
    reg = FakeWinreg({COMPUTE_SYSTEM_KEY: [VM_A.upper(), "{" + WSL.upper() + "}"]})
    systems = RegistryComputeSystems(reg)
    assert systems.list_ids() == [VM_A.upper(), "{" + WSL.upper() + "}"]
    assert candidate_urls(systems.list_ids()) == [f"hvsock://{VM_A}:6669", f"hvsock://{WSL}:6669"]
    assert reg.open_handles == 0
    assert RegistryComputeSystems(FakeWinreg({})).list_ids() == []  # no compute system since boot


def test_candidates_skip_junk_and_duplicates():
    assert candidate_urls(["not-a-guid", VM_A, VM_A.upper(), "", WSL], port=7) == [
        f"hvsock://{VM_A}:7", f"hvsock://{WSL}:7"]


def test_a_vm_that_disappears_while_the_registry_is_read():
    reg = FakeWinreg({COMPUTE_SYSTEM_KEY: [VM_A, GONE, WSL]})

    def vanish(index):
        if index == 1:  # GONE stops while we enumerate: the subkeys shift under us
            reg.keys[COMPUTE_SYSTEM_KEY] = [VM_A, WSL]

    reg.on_enum = vanish
    ids = RegistryComputeSystems(reg).list_ids()
    assert GONE not in ids and VM_A in ids  # WSL may be skipped this round; the next round lists it
    reg.on_enum = None
    assert RegistryComputeSystems(reg).list_ids() == [VM_A, WSL]
    # the whole key goes away mid-enumeration (the last VM stopped): what was read so far, no error
    reg.on_enum = lambda index: reg.keys.pop(COMPUTE_SYSTEM_KEY, None) if index == 1 else None
    reg.keys[COMPUTE_SYSTEM_KEY] = [VM_A, WSL]
    assert RegistryComputeSystems(reg).list_ids() == [VM_A]
    assert reg.open_handles == 0


def test_candidates_are_read_again_every_call_and_errors_give_none(caplog):
    class Flaky:
        def __init__(self):
            self.answers = [[VM_A], PermissionError(5, "Access is denied"), PermissionError(5, "Access is denied"),
                            [VM_A, WSL]]

        def list_ids(self):
            answer = self.answers.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return answer

    caplog.set_level(logging.INFO)
    candidates = RegistryCandidates(Flaky())
    assert candidates() == [f"hvsock://{VM_A}:6669"]
    assert candidates() == [] and candidates() == []
    assert candidates() == [f"hvsock://{VM_A}:6669", f"hvsock://{WSL}:6669"]
    denied = [r for r in caplog.records if "Access is denied" in r.getMessage()]
    assert len(denied) == 1  # logged once, not once a round


# ---------------------------------------------------------------- the handshake over a fake transport


class FakeHyperV:
    """A fake hvsock transport: dial(url) gives an in-memory stream to the VM's handshake side.

    ``behaviour[vm_id]`` is what that VM does: ``"answer"`` (the signature, then
    it reads READY), ``"wrong"`` (another phrase), ``"silent"``, ``"half"`` (half
    the signature, then the VM is gone) or ``"gone"`` (the dial fails).  A VM
    not in the map is refused, as Windows refuses a VM that has stopped.
    """

    def __init__(self, nursery: trio.Nursery, behaviour: dict[str, str]):
        self.nursery = nursery
        self.behaviour = behaviour
        self.dials: list[str] = []
        self.ready_from: list[str] = []

    async def dial(self, url: str) -> trio.abc.Stream:
        await trio.lowlevel.checkpoint()
        ep = parse_url(url)
        assert ep.scheme == "hvsock" and ep.port == 6669
        self.dials.append(ep.vm_id)
        what = self.behaviour.get(ep.vm_id, "gone")
        if what == "gone":
            raise ConnectionRefusedError(10061, "No connection could be made because the target machine actively refused it")
        host, vm = trio.testing.memory_stream_pair()
        self.nursery.start_soon(self._vm, ep.vm_id, what, vm)
        return host

    async def _vm(self, vm_id: str, what: str, stream: trio.abc.Stream) -> None:
        try:
            if what == "answer":
                await stream.send_all(SIGNATURE)
                data = await stream.receive_some(len(READY))
                if data == READY:
                    self.ready_from.append(vm_id)
            elif what == "wrong":
                await stream.send_all(b"github.com/someone-else/a-different-phrase-of-53bytes")
            elif what == "half":
                await stream.send_all(SIGNATURE[:20])
            elif what == "silent":
                await trio.sleep_forever()
        except trio.BrokenResourceError:
            pass
        finally:
            await stream.aclose()


def test_the_handshake_chooses_the_vm_that_answers_among_several():
    reg = FakeWinreg({COMPUTE_SYSTEM_KEY: [VM_A.upper(), GONE, VM_B.upper()]})
    rounds = []

    def listing():
        urls = RegistryCandidates(RegistryComputeSystems(reg))()
        rounds.append(urls)
        if len(rounds) == 2:  # WSL starts between round 2 and 3; GONE has stopped by then
            reg.keys[COMPUTE_SYSTEM_KEY] = [VM_A.upper(), VM_B.upper(), WSL.upper()]
        return urls

    async def main():
        async with trio.open_nursery() as nursery:
            hv = FakeHyperV(nursery, {VM_A: "wrong", VM_B: "silent", GONE: "half", WSL: "answer"})
            found = await find_vm(listing, interval=1, give_up=30, probe_timeout=0.5, dial=hv.dial)
            assert found == f"hvsock://{WSL}:6669"
            assert len(rounds) == 3 and f"hvsock://{GONE}:6669" in rounds[0] and f"hvsock://{WSL}:6669" in rounds[2]
            assert hv.dials.count(VM_A) == 3 and hv.dials.count(GONE) == 2
            await signal_ready(found, dial=hv.dial)
            assert hv.ready_from == [WSL]
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_vm_that_disappears_mid_probe_does_not_end_the_round():
    async def main():
        async with trio.open_nursery() as nursery:
            # GONE is listed but refuses the dial; VM_A hangs up half-way through the signature
            hv = FakeHyperV(nursery, {VM_A: "half", VM_B: "answer"})
            urls = candidate_urls([GONE, VM_A, VM_B])
            assert await find_vm(urls, interval=1, give_up=5, dial=hv.dial) == f"hvsock://{VM_B}:6669"
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_no_vm_listed_at_all_is_said_so():
    from rdswitch.handshake import HandshakeError

    with pytest.raises(HandshakeError, match=r"within 3s \(no candidate VM was listed\)"):
        trio.run(lambda: find_vm(lambda: [], interval=1, give_up=3), clock=trio.testing.MockClock(autojump_threshold=0))


def test_rounds_with_no_vm_listed_wait_for_one():
    listed = [[], [], [VM_A]]

    async def main():
        async with trio.open_nursery() as nursery:
            hv = FakeHyperV(nursery, {VM_A: "answer"})
            found = await find_vm(lambda: candidate_urls(listed.pop(0) if listed else [VM_A]), interval=1,
                                  give_up=10, dial=hv.dial)
            assert found == f"hvsock://{VM_A}:6669" and trio.current_time() == pytest.approx(2)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


# ---------------------------------------------------------------- only the VM that passed the handshake


def test_refusal_decision():
    cid3 = "vsock://3:6669"
    assert refusal(False, None, "vsock://9:1") is None  # no handshake: as before, anyone
    assert "no VM has passed" in refusal(True, None, "vsock://3:1")
    assert refusal(True, cid3, "vsock://3:49152") is None  # the port the VM dials from does not matter
    assert "not the VM that passed the handshake" in refusal(True, cid3, "vsock://4:49152")
    assert refusal(True, cid3, "unix:///tmp/x.sock") is not None  # no CID at all: not that VM
    vm = f"hvsock://{VM_A}:6669"
    assert refusal(True, vm, f"hvsock://{VM_A.upper()}:6656") is None
    assert refusal(True, vm, f"hvsock://{VM_B}:6656") is not None
    assert refusal(True, vm, "vsock://3:6656") is not None
    # a handshake over unix/tcp (tests, the sandbox) names no VM: nothing to compare, admitted
    assert refusal(True, "unix:///run/hs.sock", "unix:///run/host.sock") is None


class FakeListener(trio.abc.Listener):
    def __init__(self, links):
        self.send, self.receive = trio.open_memory_channel(10)
        for link in links:
            self.send.send_nowait(link)

    async def accept(self):
        return await self.receive.receive()

    async def aclose(self):
        await trio.lowlevel.checkpoint()


def test_a_data_session_from_a_wrong_peer_is_refused(caplog):
    caplog.set_level(logging.INFO)
    net = NetConfig()

    async def main():
        with trio.fail_after(10):
            await refused_and_admitted()

    async def refused_and_admitted():
        hs = switch_host.build(net, NatPolicy(net))
        gate = PeerGate(handshake_used=True, found=f"hvsock://{WSL}:6669")
        intruder, vm = MemoryLink(), MemoryLink()
        intruder.peer = f"hvsock://{VM_A}:6656"
        vm.peer = f"hvsock://{WSL.upper()}:6656"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_listener, hs, FakeListener([intruder, vm]), "hvsock://:6656", gate)
            while not hs.sessions:
                await hs.sessions_changed.wait()
            [session] = hs.sessions.values()
            assert session.peer == vm.peer
            # the intruder's link was closed without a session: its channel to the host is gone
            with pytest.raises(trio.BrokenResourceError):  # the host closed its end
                intruder.to_host.send_nowait(b"x" * 60)
            assert hs.counters.drops["session-refused-peer"] == 1
            vm.to_host.close()
            while hs.sessions:
                await hs.sessions_changed.wait()
            nursery.cancel_scope.cancel()

    trio.run(main)
    refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refused) == 1 and VM_A in refused[0] and "not the VM that passed the handshake" in refused[0]


def test_before_the_handshake_nobody_gets_a_session():
    net = NetConfig()

    async def main():
        hs = switch_host.build(net, NatPolicy(net))
        link = MemoryLink()
        link.peer = "vsock://3:1025"
        await admit_session(hs, PeerGate(handshake_used=True), link)
        assert not hs.sessions and hs.counters.drops["session-refused-peer"] == 1

    trio.run(main)


def test_the_host_loop_admits_the_vm_it_found():
    class FakeHostSwitch:
        sessions: dict = {}
        sessions_changed = trio.Event()

    async def main():
        async with trio.open_nursery() as nursery:
            hv = FakeHyperV(nursery, {VM_A: "wrong", WSL: "answer"})
            gate = PeerGate(handshake_used=True)
            nursery.start_soon(functools.partial(handshake, FakeHostSwitch(), candidate_urls([VM_A, WSL]), gate=gate,
                                                 dial=hv.dial))
            while not hv.ready_from:
                await trio.sleep(0.1)  # ok-sleep: virtual time (MockClock), polling the fake VM
            assert gate.found == f"hvsock://{WSL}:6669"
            assert gate.refusal(f"hvsock://{WSL}:6656") is None and gate.refusal(f"hvsock://{VM_A}:6656")
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


# ---------------------------------------------------------------- defaults


def test_windows_defaults():
    p = defaults.plan([], [], windows=True, vsock_works=False, runtime_dir=None)
    assert p.registry and p.handshake_used and p.listen == ["hvsock://:6656"]
    p = defaults.plan([], [f"hvsock://{WSL}:6669"], windows=True, vsock_works=False, runtime_dir=None)
    assert not p.registry and p.handshake_used and p.listen == ["hvsock://:6656"]
    p = defaults.plan(["tcp://127.0.0.1:0"], [], windows=True, vsock_works=False, runtime_dir=None)
    assert not p.handshake_used and p.listen == ["tcp://127.0.0.1:0"]


def test_linux_defaults():
    p = defaults.plan([], [], windows=False, vsock_works=True, runtime_dir="/run/user/1000")
    assert p.listen == ["vsock://:6656"] and not p.handshake_used
    p = defaults.plan([], [], windows=False, vsock_works=False, runtime_dir="/run/user/1000")
    assert p.listen == ["unix:///run/user/1000/rdswitch-host.sock"]
    p = defaults.plan([], ["vsock://3:6669", "vsock://4:6669"], windows=False, vsock_works=False, runtime_dir=None)
    assert p.listen == ["vsock://:6656"] and p.handshake_used and not p.registry
    with pytest.raises(ConfigError, match="nothing to serve"):
        defaults.plan([], [], windows=False, vsock_works=False, runtime_dir=None)
    with pytest.raises(ConfigError, match="nothing to serve"):
        defaults.plan([], [], windows=False, vsock_works=False, runtime_dir="relative/dir")
    with pytest.raises(ConfigError, match="needs a --listen URL"):
        defaults.plan([], ["unix:///run/hs.sock"], windows=False, vsock_works=True, runtime_dir="/run/user/0")
