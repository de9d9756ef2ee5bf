"""rdswitch gvproxy's pure part: gvproxy's command line and -config file -> host-switch's argv and the plan."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rdswitch.gvproxy.options import (
    SshForward,
    UsageError,
    build,
    load_config,
    parse_command_line,
    plan_from_argv,
)
from rdswitch.gvproxy.run import host_args

PODMAN = ["-listen", "unix:///r/api.sock", "-mtu", "1500", "-ssh-port", "52345", "-listen-qemu", "unix:///r/qemu.sock",
          "-pid-file", "/r/gvproxy.pid", "-log-file", "/r/gvproxy.log", "-forward-sock", "/r/podman.sock",
          "-forward-dest", "/run/podman/podman.sock", "-forward-user", "core", "-forward-identity", "KEY"]


def pairs(argv) -> list[tuple[str, str]]:
    out = []
    it = iter(argv)
    for a in it:
        if a in ("--debug", "--trace-packets", "--allow-link-local", "--listen-stdio"):
            out.append((a, ""))
        else:
            out.append((a, next(it)))
    return out


def test_podmans_command_line(tmp_path):
    key = tmp_path / "key"
    key.write_text("k")
    plan = plan_from_argv([a.replace("KEY", str(key)) for a in PODMAN])
    got = pairs(plan.host_argv)
    assert ("--listen-qemu", "unix:///r/qemu.sock") in got and ("--api-listen", "unix:///r/api.sock") in got
    assert ("--port-forward", "127.0.0.1:52345=192.168.127.2:22") in got
    assert ("--mtu", "1500") in got and ("--nat", "192.168.127.254=127.0.0.1") in got
    assert ("--gateway-virtual-ip", "192.168.127.254") in got and ("--vm-mac", "5a:94:ef:e4:0c:ee") in got
    assert (plan.pid_file, plan.log_file, plan.log_level) == ("/r/gvproxy.pid", "/r/gvproxy.log", "info")
    assert plan.ssh_forwards == (SshForward("/r/podman.sock", "/run/podman/podman.sock", "core", str(key)),)
    assert [z["Name"] for z in plan.zones] == ["containers.internal.", "docker.internal."]
    # host-switch's own parser takes it (the unix paths are free)
    args = host_args(plan)
    assert args.listeners == [("unix:///r/qemu.sock", "qemu")]


def test_go_flag_spellings_and_rdswitch_flags_after():
    cmd = parse_command_line(["--listen=unix:///a", "-listen", "tcp://127.0.0.1:9", "-debug", "-ssh-port=-1",
                              "-ec2-metadata-access=false", "--allow-outbound", "127.0.0.0/8", "-debug"])
    assert cmd.values == {"listen": ["unix:///a", "tcp://127.0.0.1:9"], "debug": True, "ssh-port": -1,
                          "ec2-metadata-access": False}
    assert cmd.rdswitch_args == ("--allow-outbound", "127.0.0.0/8", "-debug")  # from the first non-gvproxy flag on
    assert parse_command_line(["-mtu", "9000", "--", "--dns-upstream", "127.0.0.1"]).rdswitch_args == (
        "--dns-upstream", "127.0.0.1")


@pytest.mark.parametrize("argv,needle", [
    (["-bogus"], "flag provided but not defined: -bogus"),
    (["-mtu"], "flag needs an argument: -mtu"),
    (["-mtu", "x"], "invalid value 'x' for flag -mtu"),
    (["-debug=maybe"], "invalid boolean value"),
    (["stray"], "unexpected argument"),
    (["-listen-qemu", "unix:///q", "-ssh-port", "80"], "between 1024 and 65535"),
    (["-listen-qemu", "unix:///q", "-forward-sock", "/s"], "must all be specified together"),
    (["-listen-qemu", "unix:///q", "-forward-sock", "/s", "-forward-dest", "/d", "-forward-user", "u",
      "-forward-identity", "/no/such/key"], "identity file '/no/such/key' can't be loaded"),
    (["-listen-qemu", "unix:///q", "-notification", "tcp://127.0.0.1:1"], "-notification"),
    (["-listen-bess", "unix:///b"], "unixpacket:///path"),
    (["-listen-vfkit", "unix:///v"], "unixgram:///path"),
    (["-listen-vpnkit", "unix:///v"], "vpnkit protocol"),
    (["-listen", "unix:///api"], "no VM interface"),
    (["-listen-qemu", "unix:///q", "-mtu", "100"], "-mtu"),
])
def test_bad_command_lines(argv, needle):
    with pytest.raises(UsageError, match=None) as info:
        plan_from_argv(argv)
    assert needle in str(info.value)


def test_interfaces_map_onto_framings():
    plan = plan_from_argv(["-listen-bess", "unixpacket:///b", "-listen-vfkit", "unixgram:///v", "-listen-stdio", "x",
                           "-services", "tcp://127.0.0.1:8081", "-pcap", "/tmp/p.pcap", "-ec2-metadata-access", "-debug"])
    got = pairs(plan.host_argv)
    assert ("--listen-bess", "unix:///b") in got and ("--listen-vfkit", "unix:///v") in got
    assert ("--listen-stdio", "") in got and ("--api-listen", "tcp://127.0.0.1:8081") in got
    assert ("--capture", "/tmp/p.pcap") in got and ("--allow-link-local", "") in got
    assert ("--debug", "") in got and ("--trace-packets", "") in got and plan.log_level == "debug"
    assert ("--port-forward", "127.0.0.1:2222=192.168.127.2:22") in got  # the default -ssh-port


CONFIG = """
log-level: warn
listen: [unix:///cfg/api.sock]
pid-file: /cfg/pid
notification: /cfg/notify.sock
interfaces:
  qemu: unix:///cfg/qemu.sock
stack:
  mtu: 9000
  subnet: 10.5.0.0/16
  gatewayMacAddress: 5a:94:ef:e4:0c:01
  dns:
    - name: z.test.
      records: [{name: a, ip: 10.1.1.1}, {regexp: '^b', ip: 10.1.1.2}]
  dnsSearchDomains: [z.test, y.test]
  forwards: {"127.0.0.1:8080": "10.5.0.2:80", "udp:127.0.0.1:5353": "10.5.0.2:53"}
  dhcpStaticLeases: {10.5.0.2: "5a:94:ef:e4:0c:02", 10.5.0.3: "5a:94:ef:e4:0c:03"}
  extra: 1
forwards:
  - {socket: "unix:///cfg/a.sock", dest: /run/a.sock, user: core, identity: KEY}
odd: 2
"""


def test_config_file_and_flags_over_it(tmp_path):
    key = tmp_path / "key"
    key.write_text("k")
    cfg = CONFIG.replace("KEY", str(key))
    plan = plan_from_argv(["-config", "c.yaml", "-mtu", "1400", "-pid-file", "/flag/pid", "-ssh-port", "3333"],
                          read_file=lambda name: cfg)
    got = pairs(plan.host_argv)
    assert ("--mtu", "1400") in got and ("--subnet", "10.5.0.0/16") in got  # -mtu over stack.mtu
    assert ("--listen-qemu", "unix:///cfg/qemu.sock") in got and ("--api-listen", "unix:///cfg/api.sock") in got
    assert ("--gateway-mac", "5a:94:ef:e4:0c:01") in got
    # gvproxy's defaults for a /16: the last usable address is the host's alias
    assert ("--nat", "10.5.255.254=127.0.0.1") in got and ("--gateway-virtual-ip", "10.5.255.254") in got
    assert ("--vm-mac", "5a:94:ef:e4:0c:02") in got and ("--dhcp-static-lease", "10.5.0.3=5a:94:ef:e4:0c:03") in got
    assert ("--dns-search", "z.test") in got and ("--dns-search", "y.test") in got
    assert ("--port-forward", "127.0.0.1:8080=10.5.0.2:80") in got
    assert ("--port-forward", "127.0.0.1:5353=10.5.0.2:53/udp") in got
    assert not any(v.endswith(":3333=10.5.0.2:22") for _, v in got)  # -ssh-port is not used with -config
    assert any("-ssh-port" in w for w in plan.warnings)
    assert plan.warnings[0] == "-config c.yaml: unknown keys ignored: stack.extra, odd"
    assert (plan.pid_file, plan.notification, plan.log_level) == ("/flag/pid", "/cfg/notify.sock", "warn")
    assert plan.ssh_forwards == (SshForward("/cfg/a.sock", "/run/a.sock", "core", str(key)),)
    assert plan.zones[0]["Name"] == "z.test." and plan.zones[0]["Records"][1]["Regexp"] == "^b"
    assert [z["Name"] for z in plan.zones] == ["z.test."]  # with -config: the file's zones only


@pytest.mark.parametrize("text,needle", [
    ("stack: {mtu: '1500'}", "stack.mtu: expected an integer, got '1500'"),
    ("stack: {gatewayVirtualIPs: 10.0.0.1}", "stack.gatewayVirtualIPs: expected a list"),
    ("forwards: [{socket: [1]}]", "forwards[0].socket: expected a string"),
    ("stack: {debug: 1}", "stack.debug: expected true or false"),
    ("[1, 2]", "expected a mapping"),
])
def test_config_wrong_types_name_the_key(text, needle):
    with pytest.raises(UsageError) as info:
        load_config(text, "c.yaml")
    assert str(info.value).startswith("-config c.yaml: ") and needle in str(info.value)


@pytest.mark.parametrize("stack,needle", [
    ("subnet: 10.0.0.0/28", "stack.subnet"),
    ("gatewayIP: 192.168.127.5", "stack.gatewayIP"),
    ("gatewayMacAddress: nope", "stack.gatewayMacAddress"),
    ("nat: {192.168.127.254: localhost}", "stack.nat.192.168.127.254"),
    ("gatewayVirtualIPs: [10.9.9.9]", "stack.gatewayVirtualIPs[0]"),
    ("dhcpStaticLeases: {192.168.127.3: zz}", "stack.dhcpStaticLeases.192.168.127.3"),
    ("forwards: {127.0.0.1:80: 10.9.9.9:80}", "stack.forwards.127.0.0.1:80"),
    ("dns: [{name: z., records: [{name: a, ip: x}]}]", "stack.dns[0]"),
])
def test_config_bad_values_name_the_key(stack, needle):
    text = f"interfaces: {{qemu: 'unix:///q'}}\nstack:\n  {stack}\n"
    with pytest.raises(UsageError) as info:
        plan_from_argv(["-config", "c.yaml"], read_file=lambda name: text)
    assert needle in str(info.value)


def test_host_switch_complaints_become_one_line(tmp_path):
    plan = plan_from_argv(["-listen-qemu", "unix:///q", "--no-such-host-flag"])
    with pytest.raises(UsageError) as info:
        host_args(plan)
    assert "--no-such-host-flag" in str(info.value) and "\n" not in str(info.value)


_flag = st.sampled_from(["-listen", "-mtu", "-debug", "-ssh-port", "-config", "-x", "--", "--a", "-", "v", "=", "-mtu=1"])


@given(st.lists(_flag, max_size=8))
def test_command_line_parser_never_raises_anything_but_usage_error(argv):
    try:
        parse_command_line(argv)
    except UsageError:
        pass
