"""network-setup's pure parts: flags, validation, the children's command lines."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rdswitch.config import ConfigError, go_bools
from rdswitch.network_setup import children
from rdswitch.network_setup.options import (
    UNSHARE_PREFIX,
    build_parser,
    init_command,
    parse_args,
    parse_interface_address,
    parse_unshare_arg,
    validate,
    FD3_TRAMPOLINE,
    vm_switch_command,
)


def test_defaults_follow_the_spec():
    o = parse_args([])
    assert o.tap_interface == "eth0"
    assert o.subnet == "192.168.127.0/24"
    assert o.tap_mac_address == "5a:94:ef:e4:0c:ee"
    assert o.handshake_listen == "vsock://:6669"
    assert o.host_url == "vsock://2:6656"
    assert o.netns == "rd-netns"
    # Rancher Desktop's current pair: veth-rd-wsl .2 in the default namespace, veth-rd-ns .1 inside
    assert (o.veth_host_name, o.veth_ns_name) == ("veth-rd-wsl", "veth-rd-ns")
    assert o.veth_host_address == ipaddress.IPv4Interface("192.168.143.2/24")
    assert o.veth_ns_address == ipaddress.IPv4Interface("192.168.143.1/24")
    assert o.trace_packets is False
    assert o.pid_file == "/run/wsl-init.pid"
    assert o.logfile == "/var/log/network-setup.log"
    assert o.vm_switch_logfile == "/var/log/vm-switch.log"
    assert o.unshare_args == ()
    assert o.debug is False


def test_incumbent_single_dash_flags():
    o = parse_args(["-debug", "-tap-interface", "eth1", "-subnet", "10.0.0.0/16", "-tap-mac-address", "02:00:00:00:00:01",
                    "-vm-switch-path", "/usr/local/bin/vm-switch", "-vm-switch-logfile", "/tmp/vm.log",
                    "-unshare-arg", "/sbin/init --foo", "-logfile=/tmp/ns.log"])
    assert o.debug
    assert o.tap_interface == "eth1"
    assert o.subnet == "10.0.0.0/16"
    assert o.tap_mac_address == "02:00:00:00:00:01"
    assert o.vm_switch_path == "/usr/local/bin/vm-switch"
    assert o.vm_switch_logfile == "/tmp/vm.log"
    assert o.unshare_args == ("/sbin/init", "--foo")
    assert o.logfile == "/tmp/ns.log"


@pytest.mark.parametrize("arg,expected", [("-debug=true", True), ("-debug=false", False), ("--debug=1", True),
                                          ("-debug=f", False), ("-debug", True), ("-debug=TRUE", True),
                                          ("-debug=False", False), ("-debug=yes", True), ("-debug=no", False)])
def test_go_style_bool(arg, expected):
    assert parse_args([arg]).debug is expected


@pytest.mark.parametrize("arg,expected", [("-vm-switch-offload=true", True), ("--vm-switch-offload=0", False),
                                          ("-vm-switch-offload", True)])
def test_go_style_bool_for_every_bool_flag(arg, expected):
    assert parse_args([arg]).offload is expected


def test_go_style_bool_bad_value_is_an_error(capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(["-debug=maybe"])
    assert info.value.code == 2
    assert "--debug" in capsys.readouterr().err


# Every spelling of Go's strconv.ParseBool, plus yes/no (network-setup's
# copy took them, wsl-proxy's did not; wsl-proxy's took no other flag).
@pytest.mark.parametrize("value", ["1", "t", "T", "TRUE", "true", "True", "yes", "YES"])
def test_go_bools_true_becomes_the_bare_flag(value):
    assert go_bools([f"--debug={value}", "--x"], {"debug", "x"}) == ["--debug", "--x"]


@pytest.mark.parametrize("value", ["0", "f", "F", "FALSE", "false", "False", "no", "No"])
def test_go_bools_false_drops_the_flag(value):
    assert go_bools(["--a", f"--debug={value}", "--b=1"], {"debug"}) == ["--a", "--b=1"]


def test_go_bools_leaves_other_flags_and_values():
    assert go_bools(["--subnet=x", "--debug=maybe", "--debug=", "-d=true", "--offload=true"], {"debug", "offload"}) == [
        "--subnet=x", "--debug=maybe", "--debug=", "-d=true", "--offload"]
    # a non-boolean flag's value that happens to read "true" is its value
    assert go_bools(["--subnet=true", "--name=false"], {"debug"}) == ["--subnet=true", "--name=false"]


def test_veth_subnet_and_the_first_layout():
    o = parse_args(["--veth-subnet", "10.99.0.0/24"])
    assert (str(o.veth_host_address), str(o.veth_ns_address)) == ("10.99.0.2/24", "10.99.0.1/24")
    assert o.veth_networks == (ipaddress.IPv4Network("10.99.0.0/24"),)
    # the seed's names and 192.168.1.0/24: one documented flag set away
    seed = parse_args(["--veth-host-name", "veth-rd0", "--veth-ns-name", "veth-rd1",
                       "--veth-host-address", "192.168.1.1/24", "--veth-ns-address", "192.168.1.2/24"])
    assert (seed.veth_host_name, seed.veth_ns_name) == ("veth-rd0", "veth-rd1")
    assert (str(seed.veth_host_address), str(seed.veth_ns_address)) == ("192.168.1.1/24", "192.168.1.2/24")
    # one address flag alone keeps the default for the other
    o = parse_args(["--veth-ns-address", "192.168.143.9/24"])
    assert (str(o.veth_host_address), str(o.veth_ns_address)) == ("192.168.143.2/24", "192.168.143.9/24")


def test_trace_packets_reaches_vm_switch():
    o = parse_args(["-trace-packets"])
    assert o.trace_packets and "--trace-packets" in vm_switch_command(o, 7)
    assert "--trace-packets" not in vm_switch_command(parse_args([]), 7)


def test_mac_is_normalized():
    assert parse_args(["--tap-mac-address", "5A-94-EF-E4-0C-EE"]).tap_mac_address == "5a:94:ef:e4:0c:ee"


@pytest.mark.parametrize("argv,needle", [
    (["--subnet", "10.0.0.0/28"], "invalid subnet"),
    (["--subnet", "10.0.0.1/24"], "invalid subnet"),
    (["--subnet", "nonsense"], "invalid subnet"),
    (["--tap-mac-address", "zz"], "invalid MAC"),
    (["--tap-mac-address", "01:00:5e:00:00:01"], "multicast"),
    (["--host-url", "http://x"], "--host-url"),
    (["--host-url", "fd://3"], "fd:// URLs cannot"),
    (["--host-url", "vsock://:6656"], "needs a CID"),
    (["--handshake-listen", "nope"], "--handshake-listen"),
    (["--veth-host-name", "a-name-longer-than-15"], "--veth-host-name"),
    (["--veth-ns-name", "a/b"], "--veth-ns-name"),
    (["--tap-interface", ""], "--tap-interface"),
    (["--tap-interface", "veth-rd-ns"], "same namespace"),
    (["--veth-subnet", "10.1.0.0/24", "--veth-host-address", "10.1.0.9/24"], "not both"),
    (["--veth-subnet", "10.1.0.1/24"], "--veth-subnet"),
    (["--veth-subnet", "10.1.0.0/31"], "/30 or larger"),
    (["--veth-subnet", "192.168.127.0/25"], "overlaps the virtual subnet"),
    (["--netns", "../etc"], "--netns"),
    (["--netns", ".."], "--netns"),
    (["--veth-host-address", "192.168.1.1"], "prefix length"),
    (["--veth-host-address", "192.168.1.300/24"], "--veth-host-address"),
    (["--veth-ns-address", "192.168.1.2/32"], "/32"),
    (["--veth-ns-address", "192.168.143.2/24"], "same address"),
    (["--unshare-arg", "sh -c 'unterminated"], "--unshare-arg"),
    (["--stop-timeout", "-1"], "--stop-timeout"),
    (["--stop-timeout", "abc"], "not a number"),
    (["--dial-attempts", "0"], "--dial-attempts"),
    (["--vm-switch-path", " "], "--vm-switch-path"),
])
def test_bad_input_is_a_clear_error(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert needle in err
    assert "Traceback" not in err


def test_bad_input_from_the_command_line_has_no_traceback():
    res = subprocess.run([sys.executable, "-m", "rdswitch.network_setup", "-subnet", "300.1.2.0/24"],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 2
    assert "invalid subnet" in res.stderr
    assert "Traceback" not in res.stderr


def test_vm_switch_command_default_program():
    o = parse_args(["--netns", "ns1", "--tap-interface", "eth7", "--vm-switch-logfile", "/tmp/v.log"])
    cmd = vm_switch_command(o, 9, python="/py")
    assert cmd[:4] == ["ip", "netns", "exec", "ns1"]
    assert cmd[4:8] == ["/py", "-c", FD3_TRAMPOLINE, "9"]  # fd 9 becomes fd 3
    assert cmd[8:11] == ["/py", "-m", "rdswitch.vm"]
    rest = cmd[11:]
    pairs = dict(zip(rest[::2], rest[1::2]))
    assert pairs == {"--tap-interface": "eth7", "--tap-mac-address": "5a:94:ef:e4:0c:ee",
                     "--subnet": "192.168.127.0/24", "--logfile": "/tmp/v.log"}
    assert "--debug" not in cmd and "--connect" not in cmd  # vm-switch reads fd 3, like the incumbent's


def test_vm_switch_command_path_debug_and_no_logfile():
    o = parse_args(["--vm-switch-path", "/opt/vm-switch", "--debug", "--vm-switch-logfile", ""])
    cmd = vm_switch_command(o, 3)
    assert cmd[8] == "/opt/vm-switch"
    assert "-m" not in cmd
    assert "--debug" in cmd
    assert "--logfile" not in cmd


def test_trampoline_puts_the_connection_on_fd3(tmp_path):
    """The child really reads the parent's fd N as its fd 3."""
    r, w = os.pipe()
    os.write(w, b"through fd 3")
    os.close(w)
    out = tmp_path / "out"
    child = [sys.executable, "-c", f"import os; open({str(out)!r}, 'wb').write(os.read(3, 100))"]
    subprocess.run([sys.executable, "-c", FD3_TRAMPOLINE, str(r), *child], pass_fds=(r,), check=True, timeout=30)
    os.close(r)
    assert out.read_bytes() == b"through fd 3"


def test_vm_switch_command_is_accepted_by_vm_switch():
    """The flags we pass are ones rdswitch.vm parses (a rename there breaks us here)."""
    from rdswitch.vm.__main__ import parse_args as vm_parse_args

    o = parse_args(["--debug", "--tap-mac-address", "02:11:22:33:44:55", "--subnet", "10.1.0.0/16"])
    cmd = vm_switch_command(o, 0)
    args = vm_parse_args(cmd[11:])
    assert args.connect == "fd://3"
    assert args.tap_interface == "eth0"
    assert args.debug


def test_init_command():
    o = parse_args(["--netns", "nsx", "--unshare-arg", "/sbin/init 'two words'"])
    assert init_command(o) == ["ip", "netns", "exec", "nsx", *UNSHARE_PREFIX, "/sbin/init", "two words"]
    assert list(UNSHARE_PREFIX) == ["unshare", "--pid", "--mount-proc", "--fork", "--propagation", "slave"]
    assert init_command(parse_args([])) is None
    assert init_command(parse_args(["--unshare-arg", "   "])) is None


def test_empty_strings_disable_files():
    o = parse_args(["--pid-file", "", "--logfile", ""])
    assert o.pid_file is None and o.logfile is None


@given(st.text(max_size=40))
def test_parse_unshare_arg_never_crashes(text):
    try:
        out = parse_unshare_arg(text)
    except ConfigError as exc:
        assert "--unshare-arg" in str(exc)
    else:
        assert all(isinstance(a, str) for a in out)


@given(st.text(max_size=30))
def test_interface_address_never_crashes(text):
    try:
        iface = parse_interface_address(text, "--x")
    except ConfigError as exc:
        assert "--x" in str(exc)
    else:
        assert iface.network.prefixlen < 32


@given(st.lists(st.text(max_size=12), max_size=6))
def test_validate_raises_only_config_errors(words):
    ns = build_parser().parse_args([])
    for attr, word in zip(["netns", "veth_host_name", "veth_ns_name", "tap_interface", "subnet", "host_url"], words):
        setattr(ns, attr, word)
    try:
        validate(ns)
    except ConfigError:
        pass


def test_child_pids_of_this_process():
    proc = subprocess.Popen(["sleep", "5"])
    try:
        assert proc.pid in children.child_pids(os.getpid())
    finally:
        proc.kill()
        proc.wait()
    assert children.child_pids(2**22 + 12345) == []


def test_vm_switch_offload_passthrough():
    assert "--offload" not in vm_switch_command(parse_args([]), 5)
    assert vm_switch_command(parse_args(["-vm-switch-offload"]), 5)[-1] == "--offload"
