import struct

import pytest
from hypothesis import given, settings, strategies as st

from rdswitch.config import ConfigError
from rdswitch.framing import (
    FRAMINGS,
    FramingError,
    StreamDecoder,
    check_datagram,
    encode,
    validate_framing,
)

# Mostly small frames, sometimes up to the 16-bit maximum.
frame_sizes = st.one_of(
    st.integers(1, 100),
    st.integers(1, 100),
    st.integers(1, 1600),
    st.integers(1, 65535),
)
frames_st = st.lists(
    frame_sizes.flatmap(lambda n: st.binary(min_size=n, max_size=n) if n <= 64 else st.just(bytes([n % 251]) * n)),
    max_size=12,
)


def chunk(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, last = [], 0
    for p in points + [len(data)]:
        out.append(data[last:p])
        last = p
    return out


@settings(max_examples=200, deadline=None)
@given(frames=frames_st, cuts=st.lists(st.integers(0, 10**6), max_size=20), framing=st.sampled_from(["stdio", "qemu"]))
def test_roundtrip_any_chunking(frames, cuts, framing):
    data = encode(framing, frames)
    dec = StreamDecoder(framing)
    got = []
    for piece in chunk(data, cuts):
        out = dec.feed(piece)
        assert all(type(f) is bytes for f in out)
        got.extend(out)
    dec.eof()
    assert got == frames
    assert dec.pending == 0


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300), cuts=st.lists(st.integers(0, 400), max_size=8), framing=st.sampled_from(["stdio", "qemu"]), maxf=st.integers(1, 65535))
def test_garbage_only_raises_framing_error(data, cuts, framing, maxf):
    dec = StreamDecoder(framing, max_frame=maxf)
    try:
        for piece in chunk(data, cuts):
            for f in dec.feed(piece):
                assert 1 <= len(f) <= maxf
        dec.eof()
    except FramingError as exc:
        assert exc.reason


def test_stdio_is_16bit_little_endian():
    assert encode("stdio", [b"abc"]) == b"\x03\x00abc"
    assert encode("hyperkit", [b"abc", b"\x01" * 258]) == b"\x03\x00abc\x02\x01" + b"\x01" * 258


def test_qemu_is_32bit_big_endian():
    assert encode("qemu", [b"abc"]) == b"\x00\x00\x00\x03abc"
    assert StreamDecoder("qemu").feed(b"\x00\x00\x00\x02hi\x00\x00") == [b"hi"]


def test_byte_at_a_time():
    frames = [b"x" * 5, b"y" * 300, b"z"]
    data = encode("stdio", frames)
    dec = StreamDecoder("stdio")
    got = []
    for i in range(len(data)):
        got += dec.feed(data[i : i + 1])
    assert got == frames


def test_accepts_bytearray_and_memoryview():
    dec = StreamDecoder("stdio")
    assert dec.feed(bytearray(b"\x02\x00ab\x01")) == [b"ab"]
    assert dec.feed(memoryview(b"\x00c")) == [b"c"]


def test_zero_length_frame():
    dec = StreamDecoder("stdio")
    with pytest.raises(FramingError, match="zero-length frame") as ei:
        dec.feed(b"\x01\x00a\x00\x00")
    assert ei.value.frames == [b"a"]
    with pytest.raises(FramingError):  # sticky: the stream lost sync
        dec.feed(b"\x01\x00a")


def test_frame_too_large():
    dec = StreamDecoder("qemu")
    with pytest.raises(FramingError) as ei:
        dec.feed(struct.pack(">I", 70000))
    assert ei.value.reason == "frame too large (70000 > 65535)"
    dec = StreamDecoder("stdio", max_frame=1514)
    with pytest.raises(FramingError, match="1515 > 1514"):
        dec.feed(b"\xeb")  # header split across feeds
        dec.feed(b"\x05")


def test_truncated_at_eof():
    dec = StreamDecoder("stdio")
    assert dec.feed(b"\x05\x00ab") == []
    with pytest.raises(FramingError, match="truncated frame at EOF"):
        dec.eof()
    dec = StreamDecoder("stdio")
    dec.feed(b"\x05")
    with pytest.raises(FramingError, match="truncated"):
        dec.eof()
    StreamDecoder("stdio").eof()  # nothing pending: fine


def test_encode_rejects_bad_frames():
    with pytest.raises(FramingError, match="zero-length"):
        encode("stdio", [b"a", b""])
    with pytest.raises(FramingError, match="too large"):
        encode("stdio", [b"a" * 65536])
    assert len(encode("qemu", [b"a" * 65536])) == 65540
    with pytest.raises(ConfigError):
        encode("bess", [b"a"])


def test_validate_framing():
    assert validate_framing("stdio") == "stdio"
    assert validate_framing("hyperkit") == "stdio"
    assert validate_framing(" QEMU ") == "qemu"
    assert set(FRAMINGS) == {"stdio", "qemu", "bess", "vfkit"}
    assert validate_framing("dgram") == "vfkit"
    with pytest.raises(ConfigError, match="stdio, qemu, bess, vfkit"):
        validate_framing("bogus")
    with pytest.raises(ConfigError):
        validate_framing(None)
    with pytest.raises(ConfigError):
        StreamDecoder("vfkit")


def test_check_datagram():
    assert check_datagram(b"abc") == b"abc"
    with pytest.raises(FramingError, match="zero-length"):
        check_datagram(b"")
    with pytest.raises(FramingError, match="too large"):
        check_datagram(b"a" * 65536)


class CountingBuffer(bytearray):
    """A pending buffer that counts the bytes copied into it and how often it is emptied."""

    def __init__(self):
        super().__init__()
        self.copied = 0
        self.clears = 0

    def __iadd__(self, other):
        self.copied += len(other)
        return super().__iadd__(other)

    def extend(self, other):
        other = bytes(other)
        self.copied += len(other)
        super().extend(other)

    def clear(self):
        self.clears += 1
        super().clear()

    def __delitem__(self, key):
        self.clears += 1
        super().__delitem__(key)


@pytest.mark.parametrize("frame_len,chunk", [(65535, 100_000), (65535, 3 * 65537 + 7), (1500, 262_144), (60, 4096)])
def test_decoder_copies_at_most_one_partial_frame_per_feed(frame_len, chunk):
    """The guard against quadratic buffering, by counting instead of timing.

    Frames are sliced straight out of each received chunk; only the tail of
    a frame a chunk cuts off is copied into the pending buffer, and that
    buffer is emptied at most once per feed.  A decoder that buffers
    everything (and re-slices the buffer per frame) copies whole chunks.
    """
    n_frames = max(1, 2_000_000 // (frame_len + 2))
    data = encode("stdio", [bytes([i % 251]) * frame_len for i in range(n_frames)])
    dec = StreamDecoder("stdio")
    dec._buf = buf = CountingBuffer()  # the decoder's one pending buffer (a __slots__ attribute)
    frames = feeds = 0
    for i in range(0, len(data), chunk):
        got = dec.feed(data[i : i + chunk])
        assert all(len(f) == frame_len for f in got)
        frames += len(got)
        feeds += 1
        assert dec.pending < 2 + frame_len  # never more than one incomplete frame held
    assert frames == n_frames and dec.pending == 0
    assert buf.copied <= feeds * min(chunk, 2 + frame_len)
    assert buf.clears <= feeds
