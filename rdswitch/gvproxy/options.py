"""gvproxy's flags and ``-config`` file -> host-switch's argv and the rest of the plan (pure).

The command line is read as Go's ``flag`` package reads gvproxy's (``-flag
value``, ``-flag=value``, ``--flag``; booleans take no separate value;
``-listen`` and the ``-forward-*`` flags repeat).  rdswitch's own long flags
(host-switch's: ``--allow-outbound``, ``--dns-upstream``, ...) may follow:
the first flag that is not gvproxy's starts them, or a ``--``.

The YAML file has gvproxy's schema (:data:`SCHEMA`): an unknown key is a
warning that names it; a value of the wrong type is a :class:`UsageError`
naming the key.  Flags override the file as gvproxy does: ``-listen`` replaces
the file's list, each interface flag its interface, ``-mtu``, ``-pid-file``,
``-log-file``, ``-services``, ``-notification`` theirs; ``-debug`` sets the log
level; the ``-forward-*`` flags add to the file's forwards.  Without
``-config`` gvproxy's defaults apply (``-ssh-port`` 2222, the zones
``containers.internal.`` and ``docker.internal.``); with it, only the file's.
"""

from __future__ import annotations

import ipaddress
import os
import urllib.parse
from typing import Any

import attrs

from ..config import ConfigError, NetConfig, parse_mac, parse_mtu
from ..services.dns.zones import parse_incumbent_zone
from ..services.forwarder import parse_port_forward_flag

VERSION = "v0.8.9"
PROG = "rdswitch gvproxy"
DEFAULT_SSH_PORT = 2222
DEFAULT_SUBNET = "192.168.127.0/24"
DEFAULT_LEASE_MAC = "5a:94:ef:e4:0c:ee"
#: gvproxy's built-in zones (without -config): each with gateway and host
DEFAULT_ZONES = ("containers.internal.", "docker.internal.")


class UsageError(Exception):
    """A bad flag or config value; str() is the one line to exit 2 with."""


HELP = f"""usage: {PROG} [gvproxy's flags] [host-switch's long flags, e.g. --allow-outbound CIDR]

gvisor-tap-vsock {VERSION}'s gvproxy command line, served by rdswitch's host-switch:
  -listen URL             the HTTP API (repeatable): unix:///path, tcp://host:port, vsock://:port
  -services URL           the HTTP API on one more address
  -listen-qemu URL        a QEMU VM (-netdev stream/socket): unix:///path or tcp://host:port
  -listen-bess URL        unixpacket:///path (SOCK_SEQPACKET)
  -listen-vfkit URL       unixgram:///path (vfkit, QEMU -netdev dgram)
  -listen-stdio X         one VM on stdin/stdout
  -mtu N                  the MTU DHCP announces (default 1500)
  -ssh-port N             127.0.0.1:N to the VM's :22 (default 2222; -1: none; not with -config)
  -forward-sock PATH -forward-dest PATH -forward-user USER -forward-identity KEY
                          a host unix socket to a unix socket in the VM over SSH (repeatable, by position)
  -pid-file FILE, -log-file FILE, -pcap FILE, -debug, -ec2-metadata-access
  -notification unix:///path   JSON events: ready, connection_established, connection_closed
  -config FILE.yaml       gvproxy's YAML schema; flags override it
  -version
Not served: -listen-vpnkit, and /connect, /tunnel on -listen.
"""


# --------------------------------------------------------------------------
# the command line

#: gvproxy v0.8.9's flags: name -> "str", "int", "bool" or "list" (repeatable)
FLAGS: dict[str, str] = {
    "config": "str", "listen": "list", "debug": "bool", "pcap": "str", "mtu": "int", "ssh-port": "int",
    "listen-vpnkit": "str", "listen-qemu": "str", "listen-bess": "str", "listen-stdio": "str", "listen-vfkit": "str",
    "forward-sock": "list", "forward-dest": "list", "forward-user": "list", "forward-identity": "list",
    "pid-file": "str", "log-file": "str", "services": "str", "ec2-metadata-access": "bool", "notification": "str",
    "version": "bool",
}
_TRUE = {"1", "t", "T", "true", "TRUE", "True"}
_FALSE = {"0", "f", "F", "false", "FALSE", "False"}


@attrs.frozen
class CommandLine:
    values: dict[str, Any]  # flag name -> value (lists for the repeatable ones); only the flags given
    rdswitch_args: tuple[str, ...]  # host-switch's own flags, passed on


def parse_command_line(argv: list[str]) -> CommandLine:
    """Split argv into gvproxy's flags (Go ``flag`` rules) and rdswitch's long flags after them."""
    values: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            return CommandLine(values, tuple(argv[i + 1:]))
        if arg in ("-h", "-help", "--help"):
            values["help"] = True
            i += 1
            continue
        if not arg.startswith("-") or arg == "-":
            raise UsageError(f"unexpected argument {arg!r} (gvproxy takes flags only)")
        body = arg[2:] if arg.startswith("--") else arg[1:]
        name, eq, inline = body.partition("=")
        kind = FLAGS.get(name)
        if kind is None:
            if not arg.startswith("--"):
                raise UsageError(f"flag provided but not defined: -{name}")
            return CommandLine(values, tuple(argv[i:]))  # rdswitch's own flags from here on
        if kind == "bool":
            if eq and inline not in _TRUE | _FALSE:
                raise UsageError(f"invalid boolean value {inline!r} for -{name}")
            values[name] = not eq or inline in _TRUE
            i += 1
            continue
        if eq:
            value = inline
            i += 1
        else:
            if i + 1 >= len(argv):
                raise UsageError(f"flag needs an argument: -{name}")
            value = argv[i + 1]
            i += 2
        if kind == "int":
            try:
                value = int(value, 0)
            except ValueError:
                raise UsageError(f"invalid value {value!r} for flag -{name}: parse error") from None
        if kind == "list":
            values.setdefault(name, []).append(value)
        else:
            values[name] = value
    return CommandLine(values, ())


# --------------------------------------------------------------------------
# the -config file

_STR, _INT, _BOOL = "str", "int", "bool"
_ZONE = {"name": _STR, "records": [{"name": _STR, "ip": _STR, "regexp": _STR}], "defaultIP": _STR}
#: gvproxy's GvproxyConfig (cmd/gvproxy/config.go) and types.Configuration, by YAML key
SCHEMA: dict[str, Any] = {
    "listen": [_STR],
    "log-level": _STR,
    "stack": {
        "debug": _BOOL, "capture-file": _STR, "mtu": _INT, "subnet": _STR, "gatewayIP": _STR,
        "gatewayMacAddress": _STR, "dns": [_ZONE], "dnsSearchDomains": [_STR], "forwards": {"*": _STR},
        "nat": {"*": _STR}, "gatewayVirtualIPs": [_STR], "dhcpStaticLeases": {"*": _STR},
        "vpnKitUUIDMacAddresses": {"*": _STR}, "ec2MetadataAccess": _BOOL,
    },
    "interfaces": {"vpnkit": _STR, "qemu": _STR, "bess": _STR, "stdio": _STR, "vfkit": _STR},
    "forwards": [{"socket": _STR, "dest": _STR, "user": _STR, "identity": _STR}],
    "pid-file": _STR,
    "log-file": _STR,
    "services": _STR,
    "ec2-metadata-access": _BOOL,
    "notification": _STR,
}


def _type_name(value: Any) -> str:
    return {dict: "a mapping", list: "a list", bool: "a boolean", int: "an integer", float: "a number",
            str: "a string"}.get(type(value), type(value).__name__)


def _check(value: Any, schema: Any, path: str, unknown: list[str]) -> Any:
    """``value`` with the types of ``schema``, null values dropped; UsageError naming ``path`` when a type is wrong."""
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            raise UsageError(f"{path}: expected a mapping, got {_type_name(value)}")
        out = {}
        for key, item in value.items():
            key_text = str(key)
            sub = f"{path}.{key_text}" if path else key_text
            if "*" in schema:
                if item is not None:
                    out[key_text] = _check(item, schema["*"], sub, unknown)
                continue
            if key_text not in schema:
                unknown.append(sub)
                continue
            if item is not None:
                out[key_text] = _check(item, schema[key_text], sub, unknown)
        return out
    if isinstance(schema, list):
        if not isinstance(value, list):
            raise UsageError(f"{path}: expected a list, got {_type_name(value)}")
        return [_check(item, schema[0], f"{path}[{i}]", unknown) for i, item in enumerate(value) if item is not None]
    if schema == _BOOL:
        if not isinstance(value, bool):
            raise UsageError(f"{path}: expected true or false, got {value!r}")
        return value
    if schema == _INT:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(f"{path}: expected an integer, got {value!r}")
        return value
    # a string: YAML scalars stand for their text (as gopkg.in/yaml decodes 8080 into a string field)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        return str(value)
    raise UsageError(f"{path}: expected a string, got {_type_name(value)}")


def load_config(text: str, name: str = "config") -> tuple[dict, list[str]]:
    """Parse and type-check the YAML text; returns (config, unknown keys)."""
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UsageError(f"-config {name}: not valid YAML{where}: {problem}") from None
    if data is None:
        return {}, []
    unknown: list[str] = []
    try:
        config = _check(data, SCHEMA, "", unknown)
    except UsageError as exc:
        raise UsageError(f"-config {name}: {exc}") from None
    return config, unknown


# --------------------------------------------------------------------------
# the plan


@attrs.frozen
class SshForward:
    """A host unix socket whose connections reach ``dest`` (a unix socket in the VM) over SSH."""

    socket: str
    dest: str
    user: str
    identity: str


@attrs.frozen
class Plan:
    host_argv: tuple[str, ...]
    pid_file: str | None = None
    log_file: str | None = None
    log_level: str = "info"
    notification: str | None = None
    ssh_forwards: tuple[SshForward, ...] = ()
    #: zones to add, in gvisor-tap-vsock's types.Zone JSON shape
    zones: tuple[dict, ...] = ()
    #: unknown keys of the config file, and other things worth a warning once logging is up
    warnings: tuple[str, ...] = ()
    version: bool = False
    help: bool = False
    net: NetConfig = NetConfig()


def _url_path(value: str, schemes: tuple[str, ...], what: str) -> str:
    """The path of a unix-like URL (``unix:///p``, ``unixgram:///p``); UsageError for another scheme."""
    parsed = urllib.parse.urlsplit(value)
    if parsed.scheme not in schemes or not parsed.path:
        raise UsageError(f"{what} {value!r}: expected {' or '.join(s + ':///path' for s in schemes)}")
    return parsed.path


def _listen_url(value: str, what: str) -> str:
    parsed = urllib.parse.urlsplit(value)
    if parsed.scheme not in ("unix", "tcp", "vsock"):
        raise UsageError(f"{what} {value!r}: expected unix:///path, tcp://host:port or vsock://:port")
    return value


def _first_usable(net: ipaddress.IPv4Network) -> ipaddress.IPv4Address:
    return net.network_address + 1


def _last_usable(net: ipaddress.IPv4Network) -> ipaddress.IPv4Address:
    return net.broadcast_address - 1


def build(cmd: CommandLine, config: dict | None, unknown: list[str] = (), config_name: str = "") -> Plan:
    """The plan for a parsed command line and (with -config) a checked config; UsageError for bad values."""
    v = cmd.values
    with_config = config is not None
    config = config or {}
    stack = dict(config.get("stack", {}))
    interfaces = dict(config.get("interfaces", {}))
    where = f"-config {config_name}: " if with_config else ""
    warnings = [f"-config {config_name}: unknown keys ignored: {', '.join(unknown)}"] if unknown else []

    # flags over the file, as gvproxy's GvproxyConfigure
    log_level = "debug" if v.get("debug") else config.get("log-level", "info").lower()
    if log_level not in ("trace", "debug", "info", "warn", "warning", "error", "fatal", "panic"):
        warnings.append(f'bad log level "{log_level}", falling back to "info"')
        log_level = "info"
    log_file = v.get("log-file") or config.get("log-file")
    pid_file = v.get("pid-file") or config.get("pid-file")
    for flag in ("qemu", "bess", "vfkit", "vpnkit", "stdio"):
        if v.get(f"listen-{flag}"):
            interfaces[flag] = v[f"listen-{flag}"]
    listen = v.get("listen") or config.get("listen", [])
    services = v.get("services") or config.get("services")
    ec2 = bool(v.get("ec2-metadata-access") or config.get("ec2-metadata-access") or stack.get("ec2MetadataAccess"))
    if "mtu" in v and v["mtu"] != 0:
        stack["mtu"] = v["mtu"]
    notification = None
    if v.get("notification"):
        notification = _url_path(v["notification"], ("unix",), "-notification")
    elif config.get("notification"):
        text = config["notification"]
        notification = urllib.parse.urlsplit(text).path if text.startswith("unix://") else text

    argv: list[str] = []
    try:
        mtu = parse_mtu(stack.get("mtu", 1500) or 1500)
    except ConfigError as exc:
        raise UsageError(f"{where}stack.mtu: {exc}" if "mtu" not in v else f"-mtu: {exc}") from None
    argv += ["--mtu", str(mtu)]
    subnet_text = stack.get("subnet", DEFAULT_SUBNET)
    try:
        subnet = ipaddress.IPv4Network(subnet_text, strict=False)
        net = NetConfig(subnet=str(subnet), mtu=mtu)
    except (ValueError, ConfigError) as exc:
        raise UsageError(f"{where}stack.subnet: {exc}") from None
    argv += ["--subnet", str(subnet)]
    if "gatewayIP" in stack and stack["gatewayIP"] != str(_first_usable(subnet)):
        raise UsageError(f"{where}stack.gatewayIP {stack['gatewayIP']!r}: rdswitch's gateway is the subnet's first "
                         f"address, {_first_usable(subnet)}")
    if "gatewayMacAddress" in stack:
        try:
            parse_mac(stack["gatewayMacAddress"])
        except ConfigError as exc:
            raise UsageError(f"{where}stack.gatewayMacAddress: {exc}") from None
        argv += ["--gateway-mac", stack["gatewayMacAddress"]]
    # the host's loopback alias: gvproxy's default is the subnet's last usable address, for both tables
    alias = _last_usable(subnet)
    nat = stack.get("nat") or {str(alias): "127.0.0.1"}
    for vip, real in nat.items():
        for text, what in ((vip, "virtual IP"), (real, "host IP")):
            try:
                ipaddress.IPv4Address(text)
            except ValueError:
                raise UsageError(f"{where}stack.nat.{vip}: invalid {what} {text!r}") from None
        argv += ["--nat", f"{vip}={real}"]
    for i, vip in enumerate(stack.get("gatewayVirtualIPs") or [str(alias)]):
        try:
            if ipaddress.IPv4Address(vip) not in subnet:
                raise ValueError("not in the subnet")
        except ValueError as exc:
            raise UsageError(f"{where}stack.gatewayVirtualIPs[{i}]: invalid address {vip!r} ({exc})") from None
        argv += ["--gateway-virtual-ip", vip]
    leases = stack.get("dhcpStaticLeases", {})
    if not with_config:
        leases = {"192.168.127.2": DEFAULT_LEASE_MAC}
    for ip, mac in leases.items():
        try:
            parse_mac(mac)
            if ipaddress.IPv4Address(ip) not in subnet:
                raise ValueError(f"{ip} is not in {subnet}")
        except (ValueError, ConfigError) as exc:
            raise UsageError(f"{where}stack.dhcpStaticLeases.{ip}: {exc}") from None
        if ip == str(net.vm_ip):
            argv += ["--vm-mac", mac]
        else:
            argv += ["--dhcp-static-lease", f"{ip}={mac}"]
    for domain in stack.get("dnsSearchDomains", []):
        argv += ["--dns-search", domain]
    if stack.get("vpnKitUUIDMacAddresses"):
        warnings.append(f"{where}stack.vpnKitUUIDMacAddresses: ignored (only vpnkit, which rdswitch does not serve, "
                        "uses it)")
    if ec2:
        argv.append("--allow-link-local")
    if log_level in ("debug", "trace") or stack.get("debug"):
        argv.append("--debug")
        argv.append("--trace-packets")  # gvproxy's stack.debug: print every packet

    capture = v.get("pcap") or stack.get("capture-file")
    if capture:
        argv += ["--capture", capture]

    # port forwards: -ssh-port without -config, stack.forwards with it
    forwards = dict(stack.get("forwards", {}))
    ssh_port = v.get("ssh-port", DEFAULT_SSH_PORT)
    if not with_config:
        if (ssh_port != -1 and ssh_port < 1024) or ssh_port > 65535:
            raise UsageError("ssh-port value must be between 1024 and 65535")
        if ssh_port != -1:
            forwards = {f"127.0.0.1:{ssh_port}": f"{net.vm_ip}:22"}
    elif "ssh-port" in v:
        warnings.append(f'CLI argument "-ssh-port" is unavailable with config file. You need to add '
                        f'"127.0.0.1:{ssh_port}: {net.vm_ip}:22" entry into .stack.forwards in "{config_name}" instead')
    for local, remote in forwards.items():
        proto = "tcp"
        if local.startswith("udp:"):
            local, proto = local[4:], "udp"
        flag = f"{local}={remote}" + ("/udp" if proto == "udp" else "")
        try:
            parse_port_forward_flag(flag, subnet)
        except ConfigError as exc:
            raise UsageError(f"{where}stack.forwards.{local}: {exc}" if with_config else f"-ssh-port: {exc}") from None
        argv += ["--port-forward", flag]

    # DNS zones: gvproxy's two without -config, the file's with it
    zones: list[dict] = []
    if with_config:
        for i, zone in enumerate(stack.get("dns", [])):
            body = {"Name": zone.get("name", ""), "DefaultIP": zone.get("defaultIP", ""),
                    "Records": [{"Name": r.get("name", ""), "IP": r.get("ip", ""), "Regexp": r.get("regexp", "")}
                                for r in zone.get("records", [])]}
            try:
                parse_incumbent_zone(body)
            except ConfigError as exc:
                raise UsageError(f"{where}stack.dns[{i}]: {exc}") from None
            zones.append(body)
    else:
        gw = str(net.gateway_ip)
        zones = [{"Name": name, "DefaultIP": "", "Records": [{"Name": "gateway", "IP": gw},
                                                            {"Name": "host", "IP": "192.168.127.254"}]}
                 for name in DEFAULT_ZONES]

    # the VM's interfaces
    if interfaces.get("vpnkit"):
        raise UsageError("-listen-vpnkit: the vpnkit protocol (Hyperkit's) is not served by rdswitch; use "
                         "-listen-qemu, -listen-bess, -listen-vfkit or -listen-stdio")
    if interfaces.get("qemu"):
        argv += ["--listen-qemu", _qemu_url(interfaces["qemu"])]
    if interfaces.get("bess"):
        argv += ["--listen-bess", "unix://" + _url_path(interfaces["bess"], ("unixpacket",), "-listen-bess")]
    if interfaces.get("vfkit"):
        argv += ["--listen-vfkit", "unix://" + _url_path(interfaces["vfkit"], ("unixgram",), "-listen-vfkit")]
    if interfaces.get("stdio"):
        argv.append("--listen-stdio")
    if not any(interfaces.get(k) for k in ("qemu", "bess", "vfkit", "stdio")):
        raise UsageError("no VM interface: give -listen-qemu, -listen-bess, -listen-vfkit or -listen-stdio "
                         "(rdswitch serves no /connect on -listen)")
    for url in [*listen, *([services] if services else [])]:
        argv += ["--api-listen", _listen_url(url, "-listen" if url in listen else "-services")]

    # unix sockets over SSH: matched by position, as gvproxy does
    counts = {len(v.get(f"forward-{k}", [])) for k in ("sock", "dest", "user", "identity")}
    if len(counts) != 1:
        raise UsageError("--forward-sock, --forward-dest, --forward-user, and --forward-identity must all be "
                         "specified together, the same number of times, or not at all")
    ssh = [SshForward(f.get("socket", ""), f.get("dest", ""), f.get("user", ""), f.get("identity", ""))
           for f in config.get("forwards", [])]
    ssh += [SshForward(*t) for t in zip(v.get("forward-sock", []), v.get("forward-dest", []),
                                         v.get("forward-user", []), v.get("forward-identity", []))]
    checked = []
    for f in ssh:
        if not os.path.exists(f.identity):
            raise UsageError(f"identity file {f.identity!r} can't be loaded: no such file")
        sock = f.socket
        if "://" in sock:
            sock = _url_path(sock, ("unix",), "forward socket")
        if not os.path.isabs(sock) or not f.dest or not f.user:
            raise UsageError(f"forward {f.socket!r} -> {f.dest!r}: needs an absolute socket path, a dest and a user")
        checked.append(attrs.evolve(f, socket=sock))

    return Plan(host_argv=tuple(argv) + cmd.rdswitch_args, pid_file=pid_file, log_file=log_file, log_level=log_level,
                notification=notification, ssh_forwards=tuple(checked), zones=tuple(zones),
                warnings=tuple(warnings), version=bool(v.get("version")), net=net)


def _qemu_url(value: str) -> str:
    parsed = urllib.parse.urlsplit(value)
    if parsed.scheme == "unix" and parsed.path:
        return f"unix://{parsed.path}"
    if parsed.scheme == "tcp" and parsed.netloc:
        return value
    raise UsageError(f"-listen-qemu {value!r}: expected unix:///path or tcp://host:port")


def plan_from_argv(argv: list[str], read_file=None) -> Plan:
    """The whole of it: the command line, then the -config file it names (read with ``read_file``)."""
    cmd = parse_command_line(argv)
    if cmd.values.get("help"):
        return Plan(host_argv=(), help=True)
    if cmd.values.get("version"):
        return Plan(host_argv=(), version=True)
    name = cmd.values.get("config")
    if not name:
        return build(cmd, None)
    try:
        text = (read_file or _read)(name)
    except OSError as exc:
        raise UsageError(f"failed to read config file: {name}: {exc.strerror or exc}") from None
    config, unknown = load_config(text, name)
    return build(cmd, config, unknown, name)


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read(1 << 22)
