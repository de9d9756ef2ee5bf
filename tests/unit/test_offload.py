"""The offload capability message, virtio-net headers, and partial checksums."""

import struct

import pytest
from hypothesis import given, strategies as st

from rdswitch.config import NetConfig
from rdswitch.stack.gateway import Gateway, OffloadIn
from rdswitch.wire import ethernet, ipv4, offload, tcp, udp
from rdswitch.wire.checksum import checksum
from rdswitch.wire.errors import MalformedPacket

NET = NetConfig()
A, B = NET.host_alias_ip.packed, NET.vm_ip.packed


def test_capability_roundtrip_and_gateway_event():
    payload = offload.capability_payload()
    assert offload.parse_capability(payload) == offload.FLAG_PARTIAL_CSUM_TSO
    for bad in (b"", b"RDSX\x01\x01", b"RDSW\x02\x01"):
        with pytest.raises(MalformedPacket):
            offload.parse_capability(bad)
    gw = Gateway(NET)
    frame = ethernet.build(NET.gateway_mac, NET.vm_mac, ethernet.TYPE_RDSWITCH, payload)
    assert gw.input(frame, 0.0) == ([], OffloadIn(offload.FLAG_PARTIAL_CSUM_TSO))
    # not addressed to the gateway: ignored
    frame = ethernet.build(ethernet.BROADCAST, NET.vm_mac, ethernet.TYPE_RDSWITCH, payload)
    assert gw.input(frame, 0.0) == ([], None)


@given(st.binary(max_size=2000), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
def test_partial_checksum_completes_to_a_valid_one(payload, seq, ack):
    gw = Gateway(NET)
    seg = tcp.Segment(80, 40000, seq, ack, tcp.ACK | tcp.PSH, 1000, payload)
    frame = gw.frames.tcp_frame(NET.vm_mac, A, B, seg, partial=True)
    pkt = ipv4.parse(memoryview(frame)[14:], verify=True)
    seg_bytes = bytearray(pkt.payload)
    # What the VM's kernel (or a NIC) does with NEEDS_CSUM: sum from csum_start, store the complement.
    field = struct.unpack_from("!H", seg_bytes, 16)[0]
    assert field == (~checksum(A + B + struct.pack("!BBH", 0, 6, len(seg_bytes))) & 0xFFFF)
    struct.pack_into("!H", seg_bytes, 16, checksum(seg_bytes))
    back = tcp.parse(bytes(seg_bytes), A, B, verify=True)
    assert bytes(back.payload) == payload


def test_vnet_header_for():
    gw = Gateway(NET)
    small = gw.frames.tcp_frame(NET.vm_mac, A, B, tcp.Segment(80, 1, 1, 1, tcp.ACK, 10, b"x" * 100), partial=True)
    flags, gso, hdr_len, gso_size, start, off = offload.VNET_HDR.unpack(offload.vnet_header_for(small, 1500))
    assert (flags, gso, start, off) == (offload.F_NEEDS_CSUM, offload.GSO_NONE, 34, 16)
    big = gw.frames.tcp_frame(NET.vm_mac, A, B, tcp.Segment(80, 1, 1, 1, tcp.ACK, 10, b"x" * 60000), partial=True)
    flags, gso, hdr_len, gso_size, start, off = offload.VNET_HDR.unpack(offload.vnet_header_for(big, 1500))
    assert (flags, gso, hdr_len, gso_size, start, off) == (offload.F_NEEDS_CSUM, offload.GSO_TCPV4, 54, 1460, 34, 16)
    dgram = ethernet.build(NET.vm_mac, NET.gateway_mac, ethernet.TYPE_IPV4,
                           ipv4.build(A, B, 17, udp.build(53, 5000, b"y" * 100, A, B)))
    assert offload.vnet_header_for(dgram, 1500) == offload.PLAIN
    frag = bytearray(big)
    frag[20] |= 0x20  # MF: a fragment is never marked
    assert offload.vnet_header_for(bytes(frag), 1500) == offload.PLAIN
    assert offload.vnet_header_for(b"\x00" * 20, 1500) == offload.PLAIN
