"""Configuration shared by every rdswitch process.

Every address is derived from the subnet as the wire contract
(docs/wire-contract.md) says: gateway .1, VM .2 (static lease for the VM
MAC), host-loopback alias .254.  Validation errors are raised as
:class:`ConfigError` with a message meant for a human.
"""

from __future__ import annotations

import ipaddress
import re

import attrs

DEFAULT_SUBNET = "192.168.127.0/24"
DEFAULT_GATEWAY_MAC = "5a:94:ef:e4:0c:dd"
DEFAULT_VM_MAC = "5a:94:ef:e4:0c:ee"
DEFAULT_MTU = 1500
MIN_MTU = 576
# The 16-bit framing carries at most 65535 bytes per Ethernet frame; the IP
# MTU is that minus the 14-byte Ethernet header.  65520 leaves room to spare.
MAX_MTU = 65521
HANDSHAKE_PORT = 6669
DATA_PORT = 6656
SIGNATURE = b"github.com/rancher-sandbox/rancher-desktop-networking"
READY = b"READY"

# The veth pair network-setup makes between the VM's default namespace and the
# namespace where containers run: Rancher Desktop's current names and addresses
# (it moved off 192.168.1.0/24, which collided with home LANs).  The host end
# is .2 of the veth subnet, the namespace end .1; wsl-proxy pipes to .1.
VETH_HOST_NAME = "veth-rd-wsl"
VETH_NS_NAME = "veth-rd-ns"
VETH_SUBNET = "192.168.143.0/24"
#: The first layout (veth-rd0 192.168.1.1 / veth-rd1 192.168.1.2), one flag set away.
SEED_VETH = {"veth-host-name": "veth-rd0", "veth-ns-name": "veth-rd1",
             "veth-host-address": "192.168.1.1/24", "veth-ns-address": "192.168.1.2/24"}


class ConfigError(ValueError):
    """A configuration value is invalid; str() is a message for the user."""


_MAC_RE = re.compile(r"^[0-9a-fA-F]{2}([:-][0-9a-fA-F]{2}){5}$")


def parse_mac(text: str) -> bytes:
    if not isinstance(text, str) or not _MAC_RE.match(text.strip()):
        raise ConfigError(f"invalid MAC address {text!r}: expected six hex pairs like 5a:94:ef:e4:0c:ee")
    mac = bytes(int(x, 16) for x in re.split("[:-]", text.strip()))
    if mac[0] & 1:
        raise ConfigError(f"invalid MAC address {text!r}: it is a multicast address")
    return mac


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def parse_port(text: str | int, what: str = "port") -> int:
    try:
        port = int(text)
    except (TypeError, ValueError):
        raise ConfigError(f"invalid {what} {text!r}: not a number") from None
    if not 0 < port < 65536:
        raise ConfigError(f"invalid {what} {text!r}: must be 1..65535")
    return port


def parse_mtu(text: str | int) -> int:
    try:
        mtu = int(text)
    except (TypeError, ValueError):
        raise ConfigError(f"invalid MTU {text!r}: not a number") from None
    if not MIN_MTU <= mtu <= MAX_MTU:
        raise ConfigError(f"invalid MTU {mtu}: must be {MIN_MTU}..{MAX_MTU} (the frame length is 16 bits)")
    return mtu


def parse_subnet(text: str) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.IPv4Network(text, strict=True)
    except ValueError as exc:
        raise ConfigError(f"invalid subnet {text!r}: {exc}") from None
    if net.prefixlen > 24:
        raise ConfigError(f"invalid subnet {text!r}: needs room for .1, .2 and .254 (a /24 or larger)")
    return net


def veth_addresses(subnet: str | ipaddress.IPv4Network) -> tuple[ipaddress.IPv4Interface, ipaddress.IPv4Interface]:
    """The (host end, namespace end) addresses of a veth subnet: .2 and .1, as Rancher Desktop has them."""
    try:
        net = subnet if isinstance(subnet, ipaddress.IPv4Network) else ipaddress.IPv4Network(subnet, strict=True)
    except ValueError as exc:
        raise ConfigError(f"invalid --veth-subnet {subnet!r}: {exc}") from None
    if net.prefixlen > 30:
        raise ConfigError(f"invalid --veth-subnet {subnet!r}: needs room for .1 and .2 (a /30 or larger)")
    host = ipaddress.IPv4Interface(f"{net.network_address + 2}/{net.prefixlen}")
    ns = ipaddress.IPv4Interface(f"{net.network_address + 1}/{net.prefixlen}")
    return host, ns


def parse_cidr(text: str) -> ipaddress.IPv4Network:
    try:
        return ipaddress.IPv4Network(text, strict=False)
    except ValueError as exc:
        raise ConfigError(f"invalid CIDR {text!r}: {exc}") from None


@attrs.frozen
class NetConfig:
    """The virtual network's addresses, all derived from the subnet."""

    subnet: ipaddress.IPv4Network = attrs.field(
        default=ipaddress.IPv4Network(DEFAULT_SUBNET), converter=lambda s: s if isinstance(s, ipaddress.IPv4Network) else parse_subnet(s)
    )
    gateway_mac: bytes = attrs.field(default=parse_mac(DEFAULT_GATEWAY_MAC), converter=lambda m: m if isinstance(m, bytes) else parse_mac(m))
    vm_mac: bytes = attrs.field(default=parse_mac(DEFAULT_VM_MAC), converter=lambda m: m if isinstance(m, bytes) else parse_mac(m))
    mtu: int = attrs.field(default=DEFAULT_MTU, converter=parse_mtu)
    #: virtual IP -> host IP the NAT sends it to (None: the host alias .254 -> 127.0.0.1)
    nat: tuple[tuple[ipaddress.IPv4Address, ipaddress.IPv4Address], ...] | None = None
    #: the addresses besides .1 the gateway answers ARP for (None: the host alias .254)
    virtual_ips: tuple[ipaddress.IPv4Address, ...] | None = None
    #: DHCP leases by MAC besides the VM MAC's .2
    static_leases: tuple[tuple[bytes, ipaddress.IPv4Address], ...] = ()

    @property
    def gateway_ip(self) -> ipaddress.IPv4Address:
        return self.subnet.network_address + 1

    @property
    def vm_ip(self) -> ipaddress.IPv4Address:
        return self.subnet.network_address + 2

    @property
    def host_alias_ip(self) -> ipaddress.IPv4Address:
        return self.subnet.network_address + 254

    @property
    def netmask(self) -> ipaddress.IPv4Address:
        return self.subnet.netmask

    @property
    def prefixlen(self) -> int:
        return self.subnet.prefixlen

    @property
    def gateway_ips(self) -> tuple[ipaddress.IPv4Address, ...]:
        """Every address the gateway answers ARP for."""
        extra = (self.host_alias_ip,) if self.virtual_ips is None else self.virtual_ips
        return (self.gateway_ip, *(ip for ip in extra if ip != self.gateway_ip))

    @property
    def nat_table(self) -> dict[ipaddress.IPv4Address, ipaddress.IPv4Address]:
        if self.nat is not None:
            return dict(self.nat)
        return {self.host_alias_ip: ipaddress.IPv4Address("127.0.0.1")}

    @property
    def dhcp_pool(self) -> range:
        """Host numbers handed out dynamically: .3 up to .253 (.254 is the host alias)."""
        size = min(self.subnet.num_addresses - 1, 254)
        return range(3, size)


def parse_ipv4_address(text: str, what: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(str(text).strip())
    except ValueError:
        raise ConfigError(f"invalid {what} {text!r}: expected an IPv4 address like 192.168.127.254") from None


def parse_nat_flag(text: str) -> tuple[ipaddress.IPv4Address, ipaddress.IPv4Address]:
    """``--nat 192.168.127.254=127.0.0.1``: flows to the virtual IP go to the host IP."""
    virtual, sep, real = str(text).partition("=")
    if not sep:
        raise ConfigError(f"invalid --nat {text!r}: expected VIRTUAL_IP=HOST_IP, like 192.168.127.254=127.0.0.1")
    return parse_ipv4_address(virtual, "--nat virtual IP"), parse_ipv4_address(real, "--nat host IP")


def parse_static_lease_flag(text: str) -> tuple[bytes, ipaddress.IPv4Address]:
    """``--dhcp-static-lease 192.168.127.3=5a:94:ef:e4:0c:ef`` -> (MAC, IP)."""
    ip, sep, mac = str(text).partition("=")
    if not sep:
        raise ConfigError(f"invalid --dhcp-static-lease {text!r}: expected IP=MAC, like 192.168.127.3=5a:94:ef:e4:0c:ef")
    return parse_mac(mac), parse_ipv4_address(ip, "--dhcp-static-lease IP")


def normalize_argv(argv: list[str], long_flags: set[str]) -> list[str]:
    """Accept the incumbent's single-dash long flags (``-debug``) as ``--debug``.

    ``long_flags`` are the flag names without dashes.  ``-flag=value`` works too.
    """
    out = []
    for arg in argv:
        if arg.startswith("-") and not arg.startswith("--"):
            name = arg[1:].split("=", 1)[0]
            if name in long_flags:
                arg = "-" + arg
        out.append(arg)
    return out


#: Values taken as true / false for a boolean flag (compared case-insensitively):
#: every spelling of Go's strconv.ParseBool, which the incumbent's flag
#: package uses, plus yes/no, which network-setup has always accepted.
BOOL_TRUE = frozenset({"1", "t", "true", "yes"})
BOOL_FALSE = frozenset({"0", "f", "false", "no"})


def go_bools(argv: list[str], bool_flags: set[str]) -> list[str]:
    """Accept Go's ``--flag=true`` / ``--flag=false`` for the boolean flags in ``bool_flags``.

    Run it after :func:`normalize_argv` (so ``-debug=true`` is ``--debug=true``
    here).  A true value becomes ``--flag``; a false one is dropped (every
    boolean flag defaults to off).  Any other value is left as it is, for
    argparse to reject.  ``bool_flags`` are names without dashes.
    """
    out = []
    for arg in argv:
        if arg.startswith("--") and "=" in arg:
            name, value = arg[2:].split("=", 1)
            if name in bool_flags:
                if value.lower() in BOOL_TRUE:
                    arg = "--" + name
                elif value.lower() in BOOL_FALSE:
                    continue
        out.append(arg)
    return out
