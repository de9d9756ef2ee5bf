"""DHCP/BOOTP messages (RFC 2131, options RFC 2132): parse and build.

Only the UDP payload is handled here.  :func:`parse` turns bytes into a
:class:`DhcpMessage` and raises :class:`MalformedPacket` (and nothing else) for
anything it cannot trust: truncation, a bad magic cookie, an option running
past the end, a known option with an impossible length, a missing message
type.  Because the options this module knows are validated at parse time,
the convenience properties of a parsed message never raise.

:func:`build` writes the fixed header, the magic cookie, the options (an
option longer than 255 bytes is split into several instances, RFC 3396; the
parser concatenates them again), END, and pads to at least 300 bytes as real
servers do (some old BOOTP clients drop anything shorter).
"""

from __future__ import annotations

import ipaddress
import struct
from ipaddress import IPv4Address
from typing import Iterable

import attrs

from .errors import MalformedPacket

SERVER_PORT = 67
CLIENT_PORT = 68

BOOTREQUEST = 1
BOOTREPLY = 2

HTYPE_ETHERNET = 1
FLAG_BROADCAST = 0x8000

MAGIC_COOKIE = b"\x63\x82\x53\x63"
MIN_SIZE = 300  # BOOTP minimum; what real servers pad to

# Message types (option 53)
DISCOVER = 1
OFFER = 2
REQUEST = 3
DECLINE = 4
ACK = 5
NAK = 6
RELEASE = 7
INFORM = 8

MESSAGE_TYPE_NAMES = {
    DISCOVER: "DISCOVER",
    OFFER: "OFFER",
    REQUEST: "REQUEST",
    DECLINE: "DECLINE",
    ACK: "ACK",
    NAK: "NAK",
    RELEASE: "RELEASE",
    INFORM: "INFORM",
}

# Option codes
OPT_PAD = 0
OPT_SUBNET_MASK = 1
OPT_ROUTER = 3
OPT_DNS = 6
OPT_HOSTNAME = 12
OPT_DOMAIN_NAME = 15
OPT_MTU = 26
OPT_BROADCAST_ADDR = 28
OPT_REQUESTED_IP = 50
OPT_LEASE_TIME = 51
OPT_OVERLOAD = 52
OPT_MESSAGE_TYPE = 53
OPT_SERVER_ID = 54
OPT_PARAM_REQUEST_LIST = 55
OPT_MESSAGE = 56
OPT_MAX_MESSAGE_SIZE = 57
OPT_T1 = 58
OPT_T2 = 59
OPT_VENDOR_CLASS = 60
OPT_CLIENT_ID = 61
OPT_DOMAIN_SEARCH = 119
OPT_END = 255

INFINITE_LEASE = 0xFFFFFFFF

_FIXED = struct.Struct("!BBBBIHH4s4s4s4s16s64s128s")
assert _FIXED.size == 236
HEADER_SIZE = _FIXED.size + len(MAGIC_COOKIE)  # 240

_ZERO = IPv4Address(0)

# --------------------------------------------------------------------------
# Option value encoders / decoders.  Encoders raise ValueError for values that
# cannot be encoded (a programming or configuration error, not bad input);
# decoders raise MalformedPacket.


def encode_ip(addr: IPv4Address | str) -> bytes:
    return IPv4Address(addr).packed


def encode_ips(addrs: Iterable[IPv4Address | str]) -> bytes:
    out = b"".join(IPv4Address(a).packed for a in addrs)
    if not out:
        raise ValueError("an address list option needs at least one address")
    return out


def encode_u16(value: int) -> bytes:
    return struct.pack("!H", value)


def encode_u32(value: int) -> bytes:
    return struct.pack("!I", value)


def encode_str(text: str) -> bytes:
    data = text.encode("utf-8")
    if not data:
        raise ValueError("a string option cannot be empty")
    return data


def decode_ip(data: bytes, what: str = "address option") -> IPv4Address:
    if len(data) != 4:
        raise MalformedPacket("dhcp bad option length", f"{what}: {len(data)} bytes, expected 4")
    return IPv4Address(data)


def decode_ips(data: bytes, what: str = "address list option") -> tuple[IPv4Address, ...]:
    if not data or len(data) % 4:
        raise MalformedPacket("dhcp bad option length", f"{what}: {len(data)} bytes, expected a non-zero multiple of 4")
    return tuple(IPv4Address(data[i : i + 4]) for i in range(0, len(data), 4))


def decode_u16(data: bytes, what: str = "16-bit option") -> int:
    if len(data) != 2:
        raise MalformedPacket("dhcp bad option length", f"{what}: {len(data)} bytes, expected 2")
    return struct.unpack("!H", data)[0]


def decode_u32(data: bytes, what: str = "32-bit option") -> int:
    if len(data) != 4:
        raise MalformedPacket("dhcp bad option length", f"{what}: {len(data)} bytes, expected 4")
    return struct.unpack("!I", data)[0]


def decode_str(data: bytes) -> str:
    """Text options: tolerate a trailing NUL (some clients send one) and bad UTF-8."""
    return data.rstrip(b"\x00").decode("utf-8", errors="replace")


_LABEL_OK = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")


def _encode_name(name: str) -> bytes:
    name = name.strip()
    if name.endswith("."):
        name = name[:-1]
    if not name:
        raise ValueError("empty domain name")
    out = bytearray()
    for label in name.split("."):
        raw = label.encode("ascii", errors="strict") if label.isascii() else None
        if raw is None:
            try:
                raw = label.encode("idna")
            except UnicodeError as exc:
                raise ValueError(f"invalid domain label {label!r}: {exc}") from None
        if not 0 < len(raw) <= 63 or not set(raw) <= _LABEL_OK:
            raise ValueError(f"invalid domain label {label!r} in {name!r}")
        out.append(len(raw))
        out += raw
    out.append(0)
    if len(out) > 255:
        raise ValueError(f"domain name too long: {name!r}")
    return bytes(out)


def encode_domain_search(names: Iterable[str]) -> bytes:
    """RFC 3397 option 119: the names in RFC 1035 wire format, no compression."""
    out = b"".join(_encode_name(n) for n in names)
    if not out:
        raise ValueError("a domain search option needs at least one name")
    return out


def is_valid_domain(name: str) -> bool:
    try:
        _encode_name(name)
    except (ValueError, UnicodeError):
        return False
    return True


def decode_domain_search(data: bytes) -> tuple[str, ...]:
    """Decode option 119, following compression pointers.

    Every pointer must point strictly before the previous jump target (the
    start of the current name at first), so positions only ever decrease
    across jumps: decoding always terminates, whatever the input.
    """
    names = []
    pos = 0
    n = len(data)
    while pos < n:
        labels: list[str] = []
        limit = pos  # a pointer must land strictly before this
        cur = pos
        jumped = False
        name_len = 1
        while True:
            if cur >= n:
                raise MalformedPacket("dhcp bad domain search", "name runs past the end of the option")
            length = data[cur]
            if length == 0:
                cur += 1
                break
            if length & 0xC0 == 0xC0:
                if cur + 1 >= n:
                    raise MalformedPacket("dhcp bad domain search", "truncated compression pointer")
                target = ((length & 0x3F) << 8) | data[cur + 1]
                if target >= limit:
                    raise MalformedPacket("dhcp bad domain search", f"compression pointer to {target} does not point backwards")
                if not jumped:
                    pos = cur + 2
                    jumped = True
                limit = target
                cur = target
                continue
            if length & 0xC0:
                raise MalformedPacket("dhcp bad domain search", f"unsupported label type 0x{length:02x}")
            raw = data[cur + 1 : cur + 1 + length]
            if len(raw) != length:
                raise MalformedPacket("dhcp bad domain search", "label runs past the end of the option")
            if not set(raw) <= _LABEL_OK:
                raise MalformedPacket("dhcp bad domain search", f"invalid characters in label {raw!r}")
            name_len += length + 1
            if name_len > 255:
                raise MalformedPacket("dhcp bad domain search", "name longer than 255 bytes")
            labels.append(raw.decode("ascii"))
            cur += 1 + length
        if not jumped:
            pos = cur
        if not labels:
            raise MalformedPacket("dhcp bad domain search", "empty (root) name in the search list")
        names.append(".".join(labels))
    return tuple(names)


def _validate_options(options: dict[int, bytes]) -> None:
    """Reject known options whose length or content cannot be right."""
    fixed4 = {
        OPT_SUBNET_MASK: "subnet mask (1)",
        OPT_REQUESTED_IP: "requested IP (50)",
        OPT_SERVER_ID: "server id (54)",
        OPT_LEASE_TIME: "lease time (51)",
        OPT_T1: "T1 (58)",
        OPT_T2: "T2 (59)",
    }
    for code, what in fixed4.items():
        if code in options and len(options[code]) != 4:
            raise MalformedPacket("dhcp bad option length", f"{what}: {len(options[code])} bytes, expected 4")
    for code, what in ((OPT_ROUTER, "router (3)"), (OPT_DNS, "DNS servers (6)")):
        if code in options:
            decode_ips(options[code], what)
    if OPT_MTU in options:
        mtu = decode_u16(options[OPT_MTU], "MTU (26)")
        if mtu < 68:
            raise MalformedPacket("dhcp bad option value", f"MTU (26) {mtu} is below the IPv4 minimum 68")
    if OPT_MAX_MESSAGE_SIZE in options:
        decode_u16(options[OPT_MAX_MESSAGE_SIZE], "max message size (57)")
    if OPT_MESSAGE_TYPE in options and len(options[OPT_MESSAGE_TYPE]) != 1:
        raise MalformedPacket("dhcp bad option length", f"message type (53): {len(options[OPT_MESSAGE_TYPE])} bytes, expected 1")
    if OPT_DOMAIN_SEARCH in options:
        decode_domain_search(options[OPT_DOMAIN_SEARCH])


# --------------------------------------------------------------------------


def _ip(value) -> IPv4Address:
    return value if isinstance(value, IPv4Address) else IPv4Address(value)


@attrs.define(slots=True)
class DhcpMessage:
    """One DHCP/BOOTP message.

    ``chaddr`` holds the first ``hlen`` bytes of the 16-byte hardware address
    field (the 6-byte MAC for Ethernet).  ``options`` maps code -> raw value
    in wire order, without PAD/END/overload (52); use the ``encode_*`` helpers
    to fill it and the properties to read it.  ``sname``/``file`` are the raw
    BOOTP fields with trailing NULs stripped (empty when they carried options).
    """

    op: int = BOOTREQUEST
    htype: int = HTYPE_ETHERNET
    hlen: int = 6
    hops: int = 0
    xid: int = 0
    secs: int = 0
    flags: int = 0
    ciaddr: IPv4Address = attrs.field(default=_ZERO, converter=_ip)
    yiaddr: IPv4Address = attrs.field(default=_ZERO, converter=_ip)
    siaddr: IPv4Address = attrs.field(default=_ZERO, converter=_ip)
    giaddr: IPv4Address = attrs.field(default=_ZERO, converter=_ip)
    chaddr: bytes = b"\x00" * 6
    sname: bytes = b""
    file: bytes = b""
    options: dict[int, bytes] = attrs.Factory(dict)

    # --- convenience readers (never raise on a parsed message) ---

    @property
    def message_type(self) -> int | None:
        v = self.options.get(OPT_MESSAGE_TYPE)
        return v[0] if v and len(v) == 1 else None

    @property
    def message_type_name(self) -> str:
        t = self.message_type
        return MESSAGE_TYPE_NAMES.get(t, f"type-{t}") if t is not None else "BOOTP"

    @property
    def broadcast(self) -> bool:
        return bool(self.flags & FLAG_BROADCAST)

    def _opt_ip(self, code: int) -> IPv4Address | None:
        v = self.options.get(code)
        return IPv4Address(v) if v is not None and len(v) == 4 else None

    def _opt_ips(self, code: int) -> tuple[IPv4Address, ...]:
        v = self.options.get(code)
        if not v or len(v) % 4:
            return ()
        return tuple(IPv4Address(v[i : i + 4]) for i in range(0, len(v), 4))

    def _opt_u32(self, code: int) -> int | None:
        v = self.options.get(code)
        return struct.unpack("!I", v)[0] if v is not None and len(v) == 4 else None

    def _opt_str(self, code: int) -> str | None:
        v = self.options.get(code)
        return decode_str(v) or None if v else None

    @property
    def subnet_mask(self) -> IPv4Address | None:
        return self._opt_ip(OPT_SUBNET_MASK)

    @property
    def prefixlen(self) -> int | None:
        """The subnet mask as a prefix length (None if absent or not contiguous)."""
        mask = self.subnet_mask
        if mask is None:
            return None
        try:
            return ipaddress.IPv4Network(f"0.0.0.0/{mask}").prefixlen
        except ValueError:
            return None

    @property
    def routers(self) -> tuple[IPv4Address, ...]:
        return self._opt_ips(OPT_ROUTER)

    @property
    def dns_servers(self) -> tuple[IPv4Address, ...]:
        return self._opt_ips(OPT_DNS)

    @property
    def hostname(self) -> str | None:
        return self._opt_str(OPT_HOSTNAME)

    @property
    def domain_name(self) -> str | None:
        return self._opt_str(OPT_DOMAIN_NAME)

    @property
    def mtu(self) -> int | None:
        v = self.options.get(OPT_MTU)
        return struct.unpack("!H", v)[0] if v is not None and len(v) == 2 else None

    @property
    def requested_ip(self) -> IPv4Address | None:
        return self._opt_ip(OPT_REQUESTED_IP)

    @property
    def lease_time(self) -> int | None:
        return self._opt_u32(OPT_LEASE_TIME)

    @property
    def server_id(self) -> IPv4Address | None:
        return self._opt_ip(OPT_SERVER_ID)

    @property
    def param_request_list(self) -> tuple[int, ...]:
        return tuple(self.options.get(OPT_PARAM_REQUEST_LIST, b""))

    @property
    def message(self) -> str | None:
        return self._opt_str(OPT_MESSAGE)

    @property
    def t1(self) -> int | None:
        return self._opt_u32(OPT_T1)

    @property
    def t2(self) -> int | None:
        return self._opt_u32(OPT_T2)

    @property
    def client_id(self) -> bytes | None:
        return self.options.get(OPT_CLIENT_ID)

    @property
    def search_domains(self) -> tuple[str, ...]:
        v = self.options.get(OPT_DOMAIN_SEARCH)
        if not v:
            return ()
        try:
            return decode_domain_search(v)
        except MalformedPacket:
            return ()

    def summary(self) -> str:
        return f"DHCP {self.message_type_name} xid=0x{self.xid:08x} chaddr={self.chaddr.hex(':')} ciaddr={self.ciaddr} yiaddr={self.yiaddr}"


def _parse_options(area: bytes, where: str, out: dict[int, bytes]) -> None:
    i = 0
    n = len(area)
    while i < n:
        code = area[i]
        if code == OPT_PAD:
            i += 1
            continue
        if code == OPT_END:
            return
        if i + 1 >= n:
            raise MalformedPacket("dhcp option overrun", f"option {code} in {where} has no length byte")
        length = area[i + 1]
        value = area[i + 2 : i + 2 + length]
        if len(value) != length:
            raise MalformedPacket("dhcp option overrun", f"option {code} in {where} claims {length} bytes, {len(value)} left")
        # RFC 3396: several instances of one option are concatenated.
        out[code] = out.get(code, b"") + value
        i += 2 + length
    # A missing END is tolerated when the options stop exactly at the end.


def parse(data: bytes | bytearray | memoryview, *, require_message_type: bool = True) -> DhcpMessage:
    """Parse a DHCP message (the UDP payload).  Raises :class:`MalformedPacket`."""
    data = bytes(data)
    if len(data) < HEADER_SIZE:
        raise MalformedPacket("dhcp truncated", f"{len(data)} bytes, need at least {HEADER_SIZE}")
    op, htype, hlen, hops, xid, secs, flags, ci, yi, si, gi, chaddr, sname, file = _FIXED.unpack_from(data)
    if op not in (BOOTREQUEST, BOOTREPLY):
        raise MalformedPacket("dhcp bad op", f"op {op}, expected 1 (request) or 2 (reply)")
    if hlen > 16:
        raise MalformedPacket("dhcp bad hlen", f"hardware address length {hlen} exceeds 16")
    if data[236:240] != MAGIC_COOKIE:
        raise MalformedPacket("dhcp bad magic cookie", data[236:240].hex())
    options: dict[int, bytes] = {}
    _parse_options(data[240:], "options", options)
    overload = options.pop(OPT_OVERLOAD, None)
    if overload is not None:
        if len(overload) != 1 or overload[0] not in (1, 2, 3):
            raise MalformedPacket("dhcp bad option value", f"overload (52) {overload.hex()}")
        # RFC 2131 4.1: options field first, then file, then sname.
        if overload[0] & 1:
            _parse_options(file, "file field", options)
            file = b""
        if overload[0] & 2:
            _parse_options(sname, "sname field", options)
            sname = b""
    _validate_options(options)
    if require_message_type and OPT_MESSAGE_TYPE not in options:
        raise MalformedPacket("dhcp missing message type", "no option 53 (plain BOOTP is not served)")
    return DhcpMessage(
        op=op,
        htype=htype,
        hlen=hlen,
        hops=hops,
        xid=xid,
        secs=secs,
        flags=flags,
        ciaddr=IPv4Address(ci),
        yiaddr=IPv4Address(yi),
        siaddr=IPv4Address(si),
        giaddr=IPv4Address(gi),
        chaddr=chaddr[:hlen],
        sname=sname.rstrip(b"\x00"),
        file=file.rstrip(b"\x00"),
        options=options,
    )


def build(msg: DhcpMessage) -> bytes:
    """Serialize ``msg``: header, magic cookie, options, END, padded to >= 300 bytes."""
    if len(msg.chaddr) > 16:
        raise ValueError(f"chaddr is {len(msg.chaddr)} bytes, at most 16")
    if len(msg.sname) > 64 or len(msg.file) > 128:
        raise ValueError("sname is at most 64 bytes and file at most 128")
    out = bytearray(
        _FIXED.pack(
            msg.op,
            msg.htype,
            msg.hlen,
            msg.hops,
            msg.xid,
            msg.secs,
            msg.flags,
            msg.ciaddr.packed,
            msg.yiaddr.packed,
            msg.siaddr.packed,
            msg.giaddr.packed,
            msg.chaddr.ljust(16, b"\x00"),
            msg.sname.ljust(64, b"\x00"),
            msg.file.ljust(128, b"\x00"),
        )
    )
    out += MAGIC_COOKIE
    for code, value in msg.options.items():
        if code in (OPT_PAD, OPT_END, OPT_OVERLOAD) or not 0 <= code <= 255:
            raise ValueError(f"option code {code} cannot be set through options")
        value = bytes(value)
        if not value:
            out += bytes((code, 0))
            continue
        for i in range(0, len(value), 255):  # RFC 3396 long options
            chunk = value[i : i + 255]
            out += bytes((code, len(chunk))) + chunk
    out.append(OPT_END)
    if len(out) < MIN_SIZE:
        out += bytes(MIN_SIZE - len(out))
    return bytes(out)
