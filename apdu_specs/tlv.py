"""TLV codecs.

* The record TLV of the social security card's record files (card-spec §2.3): one tag byte (the
  record identifier), one length byte, the value. ``RecordTlv`` is its ``construct`` layout.
* A minimal BER-TLV (ISO 7816-4) for FCIs: 1- or 2-byte tags, 1- or 2-byte lengths (``81 xx``),
  constructed tags parsed recursively.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import construct as cs

RecordTlv = cs.Struct(
    "tag" / cs.Int8ub,
    "length" / cs.Int8ub,
    "value" / cs.Bytes(cs.this.length),
)


class TlvError(ValueError):
    """Malformed TLV data."""


def encode_record(tag: int, value: bytes) -> bytes:
    if not 0 < tag < 0xFF:
        raise TlvError(f"record tag {tag:#x} out of range")
    if len(value) > 0xFF:
        raise TlvError("record value longer than 255 bytes")
    return bytes((tag, len(value))) + value


def decode_record(data: bytes) -> tuple[int, bytes]:
    """One complete record: ``(tag, value)``; the length must match exactly."""
    if len(data) < 2:
        raise TlvError("record shorter than its header")
    tag, length = data[0], data[1]
    if tag in (0x00, 0xFF):
        raise TlvError(f"invalid record tag {tag:#04x}")
    if len(data) != 2 + length:
        raise TlvError(f"record length byte says {length}, value has {len(data) - 2}")
    return tag, data[2:]


def split_records(data: bytes) -> list[tuple[int, bytes]]:
    """Concatenated records (a read-all answer) into ``(tag, value)`` pairs."""
    out = []
    i = 0
    while i < len(data):
        if i + 2 > len(data):
            raise TlvError("truncated record header")
        tag, length = data[i], data[i + 1]
        if i + 2 + length > len(data):
            raise TlvError(f"record {tag:#04x} truncated")
        out.append((tag, data[i + 2 : i + 2 + length]))
        i += 2 + length
    return out


# --- BER-TLV ------------------------------------------------------------------------------------


@dataclass
class Ber:
    """A BER-TLV node: primitive (``value``) or constructed (``children``)."""

    tag: int
    value: bytes = b""
    children: list[Ber] = field(default_factory=list)

    @property
    def constructed(self) -> bool:
        first = self.tag >> 8 if self.tag > 0xFF else self.tag
        return bool(first & 0x20)

    def find(self, tag: int) -> Ber | None:
        """Depth-first search for ``tag`` below (and including) this node."""
        if self.tag == tag:
            return self
        for c in self.children:
            hit = c.find(tag)
            if hit is not None:
                return hit
        return None

    def encode(self) -> bytes:
        body = b"".join(c.encode() for c in self.children) if self.constructed else self.value
        tag = self.tag.to_bytes(2, "big") if self.tag > 0xFF else bytes((self.tag,))
        return tag + _ber_len(len(body)) + body


def _ber_len(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    if n <= 0xFF:
        return bytes((0x81, n))
    if n <= 0xFFFF:
        return b"\x82" + n.to_bytes(2, "big")
    raise TlvError("BER length too large")


# FCIs nest 3 levels; the bound keeps crafted input from exhausting Python's recursion limit.
_MAX_DEPTH = 16


def ber_decode(data: bytes, _depth: int = 0) -> list[Ber]:
    """All top-level BER-TLV nodes in ``data``; ``TlvError`` on anything malformed."""
    if _depth > _MAX_DEPTH:
        raise TlvError(f"BER-TLV nested deeper than {_MAX_DEPTH} levels")
    out: list[Ber] = []
    i = 0
    while i < len(data):
        tag = data[i]
        i += 1
        if tag & 0x1F == 0x1F:
            if i >= len(data):
                raise TlvError("truncated two-byte tag")
            tag = (tag << 8) | data[i]
            i += 1
        if i >= len(data):
            raise TlvError("missing length")
        ln = data[i]
        i += 1
        if ln & 0x80:
            k = ln & 0x7F
            if k not in (1, 2) or i + k > len(data):
                raise TlvError("bad long-form length")
            ln = int.from_bytes(data[i : i + k], "big")
            i += k
        if i + ln > len(data):
            raise TlvError(f"value of tag {tag:X} truncated")
        value = data[i : i + ln]
        i += ln
        node = Ber(tag, value)
        if node.constructed:
            node.children = ber_decode(value, _depth + 1)
        out.append(node)
    return out
