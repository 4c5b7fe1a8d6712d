"""Data-item field types of the card (card-spec §2.3), as ``construct`` constructs.

* ``cn`` — compressed numeric: BCD, left-aligned, right-padded with nibble ``F``. An
  unpersonalised item reads all ``FF`` and decodes to ``""``.
* ``an`` — alphanumeric text, left-aligned, right-padded with ``00``; ASCII, or GBK for names.
* ``b`` — binary, as is.

Each decodes to a Python value (``str`` for cn/an, ``bytes`` for b) and encodes back to exactly
the declared length; oversize or invalid values raise ``FieldError`` (a ``construct`` error
subclass would hide the item name, so the adapters raise their own).
"""

from __future__ import annotations

from typing import Any

import construct as cs

# construct's PaddedString only accepts encodings it knows the unit size of.
cs.possiblestringencodings["gbk"] = 1


class FieldError(ValueError):
    """A value does not fit its data-item type."""


class Cn(cs.Adapter):  # type: ignore[misc]
    """``cn`` of ``length`` bytes (2·length digits at most)."""

    def __init__(self, length: int):
        super().__init__(cs.Bytes(length))
        self.length = length

    def _decode(self, obj: bytes, context: Any, path: Any) -> str:
        return decode_cn(obj)

    def _encode(self, obj: str, context: Any, path: Any) -> bytes:
        return encode_cn(obj, self.length)


class An(cs.Adapter):  # type: ignore[misc]
    """``an`` of ``length`` bytes in ``encoding`` (``ascii`` or ``gbk``), ``00``-padded."""

    def __init__(self, length: int, encoding: str = "ascii"):
        super().__init__(cs.Bytes(length))
        self.length = length
        self.encoding = encoding

    def _decode(self, obj: bytes, context: Any, path: Any) -> str:
        return decode_an(obj, self.encoding)

    def _encode(self, obj: str, context: Any, path: Any) -> bytes:
        return encode_an(obj, self.length, self.encoding)


def encode_cn(value: str, length: int) -> bytes:
    if not value.isascii() or (value and not value.isdigit()):
        # never echo the value: it may be a birth date or another holder datum
        raise FieldError("cn value must be digits")
    if len(value) > 2 * length:
        raise FieldError(f"cn value longer than {2 * length} digits")
    return bytes.fromhex(value.ljust(2 * length, "F"))


def decode_cn(data: bytes) -> str:
    digits = data.hex().upper().rstrip("F")
    if digits and not digits.isdigit():
        raise FieldError(f"cn field holds non-BCD nibbles: {data.hex().upper()}")
    return digits


def encode_an(value: str, length: int, encoding: str = "ascii") -> bytes:
    try:
        raw = value.encode(encoding)
    except UnicodeEncodeError as exc:
        raise FieldError(f"an value not representable in {encoding}") from exc
    if len(raw) > length:
        raise FieldError(f"an value takes {len(raw)} bytes in {encoding}, field has {length}")
    if b"\x00" in raw:
        raise FieldError("an value contains NUL")
    return raw.ljust(length, b"\x00")


def decode_an(data: bytes, encoding: str = "ascii") -> str:
    raw = data.rstrip(b"\x00")
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as exc:
        raise FieldError(f"an field is not valid {encoding}") from exc


def gbk_len(text: str) -> int:
    """Length of ``text`` in GBK bytes (the reader interface counts field lengths this way)."""
    return len(text.encode("gbk"))
