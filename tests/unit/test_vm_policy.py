"""The VM policy as a pure function: (request, caller, policy, state) -> allowed, or the reason.

Hypothesis over listen addresses (IPv4 and IPv6: loopback, any, LAN,
link-local, IPv4-mapped and -compatible forms, host names), ports, remotes and
unix paths (``..``, ``.``, ``//``, trailing slashes, symlink-looking names);
the real filesystem side (symlinks, existing files) is tested in
tests/unit/test_unix_within.py and end to end in tests/e2e/test_vm_policy.py.
"""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import assume, given, strategies as st

from rdswitch.config import ConfigError, NetConfig
from rdswitch.services.forwarder import Forward, parse_expose
from rdswitch.services.policy import (
    HOST, REASONS, Caller, DnsAdd, DnsState, RefusalLog, State, VmPolicy, check_caller, check_dns_add, check_expose,
    check_unexpose, listen_addresses, own_addresses, parse_expose_addresses, parse_port_ranges, parse_unix_dir,
    unix_location,
)

NET = NetConfig()
VM_IP, VM2_IP = "192.168.127.2", "192.168.127.3"
ME = Caller(VM_IP, 1)
LEASES = {VM_IP: 1, VM2_IP: 2, "192.168.127.9": None}
STATE = State(LEASES, {})
DEFAULT = VmPolicy(NET)


def fwd(local: str, remote: str = f"{VM_IP}:80", protocol: str = "tcp") -> Forward:
    return parse_expose({"local": local, "remote": remote, "protocol": protocol}, VM_IP, NET.subnet)


def reason(local: str, remote: str = f"{VM_IP}:80", protocol: str = "tcp", policy: VmPolicy = DEFAULT,
           caller: Caller = ME, state: State = STATE) -> str | None:
    refusal = check_expose(fwd(local, remote, protocol), caller, policy, state)
    if refusal is not None:
        assert refusal.status == REASONS[refusal.reason] and refusal.as_json()["reason"] == refusal.reason
    return None if refusal is None else refusal.reason


# ---- the cases, one by one ---------------------------------------------------------------------------

@pytest.mark.parametrize("local,why", [
    ("127.0.0.1:8080", None),
    ("[::1]:8080", None),
    ("localhost:8080", None),
    ("LocalHost.:8080", None),
    ("0.0.0.0:8080", "vm-expose-address"),
    (":8080", "vm-expose-address"),  # net.JoinHostPort("", p): every address
    ("[::]:8080", "vm-expose-address"),
    ("[::ffff:0.0.0.0]:8080", "vm-expose-address"),  # IPv4-mapped any
    ("[::ffff:127.0.0.1]:8080", None),  # IPv4-mapped loopback is the IPv4 loopback
    ("[::ffff:192.168.1.5]:8080", "vm-expose-address"),
    ("[::127.0.0.1]:8080", "vm-expose-address"),  # IPv4-compatible: a plain (non-loopback) IPv6 address
    ("192.168.1.5:8080", "vm-expose-address"),
    ("127.0.0.2:8080", "vm-expose-address"),  # only what was granted, even on loopback
    ("[fe80::1%eth0]:8080", "vm-expose-address"),
    ("myhost:8080", "vm-expose-address"),  # a name could resolve anywhere
    ("localhost.localdomain:8080", "vm-expose-address"),
    ("0x7f.1:8080", "vm-expose-address"),  # inet_aton would read 127.0.0.1; a name here, refused
    ("127.0.0.1:80", "vm-expose-ports"),
    ("127.0.0.1:1023", "vm-expose-ports"),
    ("127.0.0.1:1024", None),
    ("127.0.0.1:65535", None),
])
def test_listen_addresses_and_ports(local, why):
    assert reason(local) == why


def test_udp_is_held_to_the_same_rules():
    assert reason("127.0.0.1:5353", protocol="udp") is None
    assert reason("0.0.0.0:5353", protocol="udp") == "vm-expose-address"
    assert reason("127.0.0.1:53", protocol="udp") == "vm-expose-ports"


@pytest.mark.parametrize("remote,why", [
    (f"{VM_IP}:80", None),
    (":80", None),  # the caller's own address
    ("192.168.127.1:80", "vm-expose-remote"),  # the gateway
    ("192.168.127.254:22", "vm-expose-remote"),  # the host alias
    ("192.168.127.0:80", "vm-expose-remote"),
    ("192.168.127.255:80", "vm-expose-remote"),
    (f"{VM2_IP}:80", "vm-expose-remote"),  # another VM's lease
    ("192.168.127.9:80", "vm-expose-remote"),  # a lease no live VM holds: not mine
    ("192.168.127.77:80", "vm-expose-remote"),  # no lease at all
])
def test_remote_is_the_callers_own_lease(remote, why):
    assert reason("127.0.0.1:8080", remote) == why
    if remote.startswith(VM2_IP) or remote.startswith("192.168.127.9"):
        assert reason("127.0.0.1:8080", remote, policy=VmPolicy(NET, cross_vm=True)) is None
    elif why:
        assert reason("127.0.0.1:8080", remote, policy=VmPolicy(NET, cross_vm=True)) == why


def test_cross_vm_message_names_the_flag():
    refusal = check_expose(fwd("127.0.0.1:8080", f"{VM2_IP}:80"), ME, DEFAULT, STATE)
    assert "--vm-expose-cross-vm" in refusal.message


def test_the_caller_must_hold_its_source_address():
    spoofer = Caller(VM2_IP, 1)  # session 1 claiming session 2's lease
    assert reason("127.0.0.1:8080", f"{VM2_IP}:80", caller=spoofer) == "vm-caller"
    assert reason("127.0.0.1:8080", caller=Caller("192.168.127.77", 1)) == "vm-caller"  # not leased
    assert reason("127.0.0.1:8080", caller=Caller(VM_IP, None)) == "vm-caller"  # no session known
    assert check_caller(Caller("192.168.127.9", 3), LEASES) is not None  # a lease nobody holds
    # a VM may hold several leases (a macvlan container): each is its own
    assert own_addresses(ME, {**LEASES, "192.168.127.10": 1}) == {VM_IP, "192.168.127.10"}


def test_the_host_may_do_everything():
    for local in ("0.0.0.0:80", ":22", "[::]:1", "myhost:8080"):
        assert reason(local, "192.168.127.77:80", caller=HOST, state=State({}, {})) is None
    assert check_expose(fwd("/etc/x.sock", f"tcp://{VM_IP}:80", "unix"), HOST, DEFAULT, STATE) is None
    assert check_unexpose(VM2_IP, ("127.0.0.1:1", "tcp"), HOST, LEASES) is None


def test_max_forwards_then_429_and_repeats_are_not_counted():
    policy = VmPolicy(NET, max_forwards=3)
    mine = {(f"127.0.0.1:{9000 + i}", "tcp"): VM_IP for i in range(3)}
    others = {("127.0.0.1:7000", "tcp"): VM2_IP, ("127.0.0.1:7001", "tcp"): "host"}
    full = State(LEASES, {**mine, **others})
    refusal = check_expose(fwd("127.0.0.1:9100"), ME, policy, full)
    assert refusal.reason == "vm-max-forwards" and refusal.status == 429 and "--vm-max-forwards" in refusal.message
    assert check_expose(fwd("127.0.0.1:9000"), ME, policy, full) is None  # the same key: a repeat (or a 409)
    # another VM's forwards and the host's do not count against this VM
    assert check_expose(fwd("127.0.0.1:9100", f"{VM2_IP}:80"), Caller(VM2_IP, 2), policy, full) is None
    assert check_expose(fwd("127.0.0.1:9100"), ME, VmPolicy(NET, max_forwards=0), STATE).reason == "vm-max-forwards"


def test_unexpose_only_ones_own():
    key = ("127.0.0.1:9000", "tcp")
    assert check_unexpose(VM_IP, key, ME, LEASES) is None
    for owner in (VM2_IP, "host"):
        refusal = check_unexpose(owner, key, ME, LEASES)
        assert refusal.reason == "vm-not-owner" and refusal.status == 403 and owner in refusal.message
    assert check_unexpose(VM2_IP, key, Caller(VM2_IP, 1), LEASES).reason == "vm-caller"  # spoofed source


# ---- addresses: every form, by property ---------------------------------------------------------------------

v4 = st.builds(ipaddress.IPv4Address, st.integers(0, 2**32 - 1))
v6 = st.builds(ipaddress.IPv6Address, st.integers(0, 2**128 - 1))
special = st.sampled_from([ipaddress.ip_address(a) for a in (
    "0.0.0.0", "127.0.0.1", "127.0.0.53", "10.0.0.1", "192.168.1.5", "169.254.1.1", "255.255.255.255",
    "::", "::1", "fe80::1", "fd00::1", "2001:db8::1", "::ffff:0.0.0.0", "::ffff:127.0.0.1", "::ffff:10.0.0.1",
    "::127.0.0.1", "::0.0.0.0")])
addresses = st.one_of(v4, v6, special)


def local_of(ip) -> str:
    return f"[{ip}]:8080" if ip.version == 6 else f"{ip}:8080"


def effective(ip):
    return ip.ipv4_mapped if ip.version == 6 and ip.ipv4_mapped is not None else ip


@given(addresses)
def test_by_default_only_the_two_loopbacks(ip):
    allowed = reason(local_of(ip)) is None
    assert allowed == (effective(ip) in (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")))


@given(addresses, st.lists(addresses, max_size=4))
def test_a_grant_allows_exactly_the_granted_address_or_its_familys_wildcard(ip, granted):
    policy = VmPolicy(NET, addresses=parse_expose_addresses([str(g) for g in granted]))
    grants = {effective(g) for g in granted}
    ip_eff = effective(ip)
    wildcard = ipaddress.ip_address("0.0.0.0" if ip_eff.version == 4 else "::")
    expected = ip_eff in grants or wildcard in grants
    if ip_eff == ipaddress.ip_address("::"):  # a [::] socket is dual-stack: it listens on IPv4 too
        expected = wildcard in grants and ipaddress.ip_address("0.0.0.0") in grants
    assert (reason(local_of(ip), policy=policy) is None) == expected


@given(addresses)
def test_any_allows_every_literal_address(ip):
    policy = VmPolicy(NET, addresses=parse_expose_addresses(["any"]))
    assert reason(local_of(ip), policy=policy) is None
    assert reason(":8080", policy=policy) is None


@given(st.from_regex(r"\A[a-z]([a-z0-9-]{0,18}[a-z0-9])?(\.[a-z]([a-z0-9-]{0,18}[a-z0-9])?){0,3}\Z"))
def test_host_names_other_than_localhost_are_refused_even_with_any(name):
    assume(name.rstrip(".").lower() != "localhost")
    policy = VmPolicy(NET, addresses=parse_expose_addresses(["any"]))
    assert reason(f"{name}:8080", policy=policy) == "vm-expose-address"


def test_empty_host_needs_both_wildcards():
    assert listen_addresses("") == listen_addresses("::") == (ipaddress.ip_address("0.0.0.0"), ipaddress.ip_address("::"))
    only_v4 = VmPolicy(NET, addresses=parse_expose_addresses(["0.0.0.0"]))
    assert reason("0.0.0.0:8080", policy=only_v4) is None and reason("10.1.2.3:8080", policy=only_v4) is None
    assert reason(":8080", policy=only_v4) == "vm-expose-address"
    assert reason("[::1]:8080", policy=only_v4) == "vm-expose-address"
    both = VmPolicy(NET, addresses=parse_expose_addresses(["0.0.0.0", "::"]))
    assert reason(":8080", policy=both) is None
    cidr = VmPolicy(NET, addresses=parse_expose_addresses(["127.0.0.0/8"]))
    assert reason("127.0.0.2:8080", policy=cidr) is None and reason("0.0.0.0:8080", policy=cidr) == "vm-expose-address"


def test_refusals_name_the_flag():
    for local, flag in (("0.0.0.0:8080", "--vm-expose-address 0.0.0.0"), (":8080", "--vm-expose-address any"),
                        ("127.0.0.1:80", "--vm-expose-ports")):
        assert flag in check_expose(fwd(local), ME, DEFAULT, STATE).message


# ---- ports --------------------------------------------------------------------------------------------------

@given(st.integers(1, 65535), st.lists(st.tuples(st.integers(1, 65535), st.integers(1, 65535)), min_size=1, max_size=4))
def test_ports_inside_the_ranges_only(port, pairs):
    ranges = [(min(a, b), max(a, b)) for a, b in pairs]
    spec = ",".join(f"{lo}-{hi}" for lo, hi in ranges)
    policy = VmPolicy(NET, ports=parse_port_ranges(spec))
    assert (reason(f"127.0.0.1:{port}", policy=policy) is None) == any(lo <= port <= hi for lo, hi in ranges)


def test_port_zero_never_reaches_the_policy():
    with pytest.raises(ConfigError, match="1..65535"):
        fwd("127.0.0.1:0")
    assert not DEFAULT.allows_port(0)


@pytest.mark.parametrize("text", ["", "0-10", "10-5", "1-65536", "abc", "80,", "-5"])
def test_bad_port_ranges(text):
    with pytest.raises(ConfigError, match="--vm-expose-ports"):
        parse_port_ranges(text)


# ---- unix paths ---------------------------------------------------------------------------------------------

UNIX = VmPolicy(NET, unix_dirs=("/run/rd/vm",))


def unix_reason(path: str, policy: VmPolicy = UNIX) -> str | None:
    return reason(path, f"tcp://{VM_IP}:2375", "unix", policy=policy)


@pytest.mark.parametrize("path,why", [
    ("/run/rd/vm/docker.sock", None),
    ("/run/rd/vm/sub/podman.sock", None),  # below DIR; the shell refuses a symlink on the way
    ("/run/rd/vm/link-to-etc", None),  # a name that may be a symlink: bind() refuses an existing name
    ("/etc/x.sock", "vm-expose-unix-dir"),
    ("/run/rd/vm", "vm-expose-unix-dir"),  # the directory itself
    ("/run/rd/vm/", "vm-expose-unix-dir"),
    ("/run/rd/vm/x.sock/", "vm-expose-unix-dir"),
    ("/run/rd/vm/../x.sock", "vm-expose-unix-dir"),
    ("/run/rd/vm/sub/../../x.sock", "vm-expose-unix-dir"),
    ("/run/rd/vm/./x.sock", "vm-expose-unix-dir"),
    ("/run/rd//vm/x.sock", "vm-expose-unix-dir"),
    ("/run/rd/vmx/x.sock", "vm-expose-unix-dir"),  # a prefix of the text, not of the path
    ("/run/rd/vm/..", "vm-expose-unix-dir"),
])
def test_unix_paths(path, why):
    assert unix_reason(path) == why
    assert unix_reason(path, DEFAULT) == "vm-expose-unix-dir"  # none by default


segments = st.one_of(st.sampled_from(["", ".", "..", "...", "vm", "run", "rd", "x.sock", "link", "-", " "]),
                     st.text(st.characters(blacklist_characters="/\0", blacklist_categories=("Cs",)), min_size=1,
                             max_size=8))


@given(st.lists(segments, max_size=7), st.booleans())
def test_an_allowed_unix_path_is_plainly_below_the_directory(parts, trailing):
    path = "/" + "/".join(parts) + ("/" if trailing else "")
    where = unix_location(path, UNIX)
    if unix_reason(path) is None:
        top, rest = where
        assert top == "/run/rd/vm" and rest and path == top + "/" + "/".join(rest)
        assert all(p not in ("", ".", "..") for p in rest)
    else:
        assert not isinstance(where, tuple)


def test_unix_dir_flag_values():
    assert parse_unix_dir("/run//rd/./vm/") == "/run/rd/vm"
    for bad in ("relative", "/", "//", "/a/.."):
        with pytest.raises(ConfigError, match="--vm-expose-unix-dir"):
            parse_unix_dir(bad)


# ---- DNS ----------------------------------------------------------------------------------------------------

ZONES = DnsState(frozenset({"docker.internal.", "rancher-desktop.internal."}),
                 {("docker.internal.", "host"): "host", ("docker.internal.", "gateway"): "host",
                  ("docker.internal.", "mine"): VM_IP, ("docker.internal.", "theirs"): VM2_IP})


def dns_reason(req: DnsAdd, policy: VmPolicy = DEFAULT, caller: Caller = ME, dns: DnsState = ZONES) -> str | None:
    refusal = check_dns_add(req, caller, policy, LEASES, dns)
    return None if refusal is None else refusal.reason


def test_dns_adds_from_a_vm():
    assert dns_reason(DnsAdd("docker.internal.", ("app",))) is None
    assert dns_reason(DnsAdd("docker.internal.", ("mine",))) is None  # its own again
    assert dns_reason(DnsAdd("docker.internal.", ("host",))) == "vm-dns"  # the host's record
    assert dns_reason(DnsAdd("docker.internal.", ("theirs",))) == "vm-dns"  # another VM's
    assert dns_reason(DnsAdd("example.com.", ("www",))) == "vm-dns"  # a new zone would take over a domain
    assert dns_reason(DnsAdd("docker.internal.", (), regexps=1)) == "vm-dns"
    assert dns_reason(DnsAdd("docker.internal.", (), default_ip=True)) == "vm-dns"
    assert dns_reason(DnsAdd("docker.internal.", ("app",)), caller=Caller(VM2_IP, 1)) == "vm-caller"
    assert check_dns_add(DnsAdd("example.com.", (), 3, True), HOST, DEFAULT, LEASES, ZONES) is None


@given(st.integers(0, 8), st.integers(0, 8), st.integers(0, 10))
def test_dns_records_are_bounded(held, asked, limit):
    owners = {("docker.internal.", f"h{i}"): VM_IP for i in range(held)}
    names = tuple(f"n{i}" for i in range(asked)) + tuple(f"h{i}" for i in range(min(held, 2)))  # repeats are free
    why = dns_reason(DnsAdd("docker.internal.", names), VmPolicy(NET, max_dns_records=limit),
                     dns=DnsState(ZONES.zones, owners))
    assert why == (None if asked == 0 or held + asked <= limit else "vm-max-dns-records")


# ---- flags and the log --------------------------------------------------------------------------------------

def test_expose_address_flag_values():
    assert parse_expose_addresses(["any"]) == (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))
    assert parse_expose_addresses(["127.0.0.1", "[::1]", "::ffff:10.0.0.1"]) == (
        ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("::1/128"), ipaddress.ip_network("10.0.0.1/32"))
    for bad in ("", "1.2.3", "localhost", "10.0.0.0/33"):
        with pytest.raises(ConfigError, match="--vm-expose-address"):
            parse_expose_addresses([bad])


def test_refusal_log_is_a_token_bucket():
    rl = RefusalLog(burst=3, period=30.0)  # 3 at once, then one per 10 s
    assert [rl.allow(0.0) for _ in range(5)] == [(True, 0)] * 3 + [(False, 0)] * 2
    assert rl.allow(5.0) == (False, 0)
    assert rl.allow(10.5) == (True, 3)  # and says how many it skipped
    assert sum(rl.allow(11.0 + i * 0.001)[0] for i in range(1000)) == 0  # a loop cannot flood the log
