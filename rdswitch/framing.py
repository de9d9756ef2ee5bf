"""Frame codecs for the data connection (sans-IO).

The framings of the data connection (the wire contract, docs/wire-contract.md):

* ``stdio`` (alias ``hyperkit``; the default, used by Rancher Desktop): each
  Ethernet frame is preceded by its length as an unsigned 16-bit
  little-endian integer.
* ``qemu``: 32-bit big-endian length prefix.
* ``bess`` (SOCK_SEQPACKET) and ``vfkit`` (SOCK_DGRAM; the peer first sends
  the datagram ``VFKT``): one frame per datagram, no prefix.  ``dgram`` is
  another name for ``vfkit``: QEMU's ``-netdev dgram`` sends frames without
  the hello, which the listener accepts too (the first frame opens the link).

:class:`StreamDecoder` turns a byte stream into frames for the two stream
framings; :func:`encode` does the reverse for a whole batch at once, so a
batch costs one ``send``.  Datagram framings need no codec beyond
:func:`check_datagram`.

This sits on the hot path, so the decoder copies each frame exactly once
(from the received chunk, or from the pending buffer, into its own
``bytes``) and trims the consumed prefix of its buffer at most once per feed.
"""

from __future__ import annotations

import struct
from typing import Iterable

from rdswitch.config import ConfigError

FRAMINGS: tuple[str, ...] = ("stdio", "qemu", "bess", "vfkit")
STREAM_FRAMINGS: tuple[str, ...] = ("stdio", "qemu")
DATAGRAM_FRAMINGS: tuple[str, ...] = ("bess", "vfkit")
ALIASES: dict[str, str] = {"hyperkit": "stdio", "dgram": "vfkit"}

#: The datagram a vfkit peer sends first.
VFKIT_HELLO = b"VFKT"

#: Largest frame the 16-bit prefix can describe; also the default limit.
MAX_FRAME = 65535

_PREFIX = {"stdio": struct.Struct("<H"), "qemu": struct.Struct(">I")}
_HARD_LIMIT = {"stdio": 0xFFFF, "qemu": 0xFFFFFFFF}


class FramingError(ValueError):
    """The peer sent bytes that are not a valid frame stream.

    ``reason`` is a short human-readable cause, e.g. ``"zero-length frame"``.
    ``frames`` holds complete frames decoded in the same :meth:`feed` call
    before the bad header (the caller may still deliver them).
    """

    def __init__(self, reason: str, frames: list[bytes] | None = None):
        super().__init__(reason)
        self.reason = reason
        self.frames = frames if frames is not None else []


def validate_framing(name: object) -> str:
    """Return the canonical name of a framing, or raise ConfigError."""
    if isinstance(name, str):
        key = name.strip().lower()
        key = ALIASES.get(key, key)
        if key in FRAMINGS:
            return key
    valid = ", ".join(FRAMINGS + tuple(ALIASES))
    raise ConfigError(f"unknown framing {name!r}: valid framings are {valid}")


def is_stream_framing(name: str) -> bool:
    return validate_framing(name) in STREAM_FRAMINGS


class StreamDecoder:
    """Length-prefixed frames from a byte stream (``stdio`` or ``qemu``)."""

    __slots__ = ("framing", "max_frame", "_unpack", "_hlen", "_buf", "_error")

    def __init__(self, framing: str = "stdio", max_frame: int = MAX_FRAME):
        framing = validate_framing(framing)
        if framing not in STREAM_FRAMINGS:
            raise ConfigError(f"framing {framing!r} is a datagram framing; a StreamDecoder needs stdio or qemu")
        if not 1 <= max_frame <= _HARD_LIMIT[framing]:
            raise ConfigError(f"max_frame {max_frame} out of range for {framing} framing")
        self.framing = framing
        self.max_frame = max_frame
        st = _PREFIX[framing]
        self._unpack = st.unpack_from
        self._hlen = st.size
        self._buf = bytearray()
        self._error: FramingError | None = None

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held back."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        """Add received bytes; return every frame they complete.

        Raises FramingError on a zero-length frame or one longer than
        ``max_frame``.  After an error the decoder stays broken: the stream
        has lost sync and every later call raises the same error.
        """
        if self._error is not None:
            raise self._error
        if not data:
            return []
        if type(data) is not bytes:
            data = bytes(data)
        unpack = self._unpack
        hlen = self._hlen
        maxf = self.max_frame
        frames: list[bytes] = []
        end = len(data)
        pos = 0
        buf = self._buf
        if buf:
            # Finish the frame left pending by an earlier feed.
            have = len(buf)
            if have < hlen:
                pos = min(hlen - have, end)
                buf += data[:pos]
                if len(buf) < hlen:
                    return frames
            (n,) = unpack(buf, 0)
            if n == 0 or n > maxf:
                self._fail(n, frames)
            need = hlen + n - len(buf)
            if end - pos < need:
                with memoryview(data) as mv:
                    buf += mv[pos:]
                return frames
            with memoryview(buf) as head, memoryview(data) as mv:
                frames.append(b"".join((head[hlen:], mv[pos : pos + need])))
            buf.clear()
            pos += need
        append = frames.append
        while end - pos >= hlen:
            (n,) = unpack(data, pos)
            if n == 0 or n > maxf:
                self._fail(n, frames)
            start = pos + hlen
            stop = start + n
            if stop > end:
                break
            append(data[start:stop])
            pos = stop
        if pos < end:
            with memoryview(data) as mv:
                buf += mv[pos:]
        return frames

    def _fail(self, n: int, frames: list[bytes]) -> None:
        reason = "zero-length frame" if n == 0 else f"frame too large ({n} > {self.max_frame})"
        self._error = FramingError(reason, frames)
        self._buf.clear()
        raise self._error

    def eof(self) -> None:
        """The stream ended; raise FramingError if a frame was cut off."""
        if self._error is not None:
            raise self._error
        if self._buf:
            n = len(self._buf)
            self._buf.clear()
            self._error = FramingError(f"truncated frame at EOF ({n} bytes pending)")
            raise self._error


def encode(framing: str, frames: Iterable[bytes]) -> bytes:
    """One buffer holding every frame with its length prefix (stream framings).

    Raises FramingError for an empty frame or one the prefix cannot describe.
    """
    return encoder(framing)(list(frames))


def encoder(framing: str):
    """``encode`` for one framing, with the framing checked once (the hot path)."""
    framing = validate_framing(framing)
    if framing not in STREAM_FRAMINGS:
        raise ConfigError(f"framing {framing!r} sends one frame per datagram; there is nothing to encode")
    pack = _PREFIX[framing].pack
    limit = _HARD_LIMIT[framing]

    def encode_frames(frames) -> bytes:
        if len(frames) == 1:
            frame = frames[0]
            n = len(frame)
            if 0 < n <= limit:
                return pack(n) + frame
        parts: list[bytes] = []
        append = parts.append
        for frame in frames:
            n = len(frame)
            if n == 0 or n > limit:
                raise FramingError("zero-length frame" if n == 0 else f"frame too large ({n} > {limit})")
            append(pack(n))
            append(frame)
        return b"".join(parts)

    return encode_frames


def check_datagram(data: bytes, max_frame: int = MAX_FRAME) -> bytes:
    """Validate one datagram-framed frame (bess, vfkit); return it unchanged."""
    n = len(data)
    if n == 0:
        raise FramingError("zero-length frame")
    if n > max_frame:
        raise FramingError(f"frame too large ({n} > {max_frame})")
    return data
