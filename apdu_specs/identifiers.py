"""Identifiers with check characters, and the ATR (card-spec §1, §2.8, §2.9).

* Social security number (for PRC nationals the 18-character citizen ID): ISO 7064 MOD 11-2.
* Card number: 8-character body + check character (weights 3,7,9,10,5,8,4,2; A–Z = 10–35).
* Card identification code: region(3, BCD) ‖ RID ``D156000005`` ‖ serial(4) ‖ auth code(4).
* ATR: ``3B 6D 00 00`` + 13 historical bytes, T8–T9 = region's first 4 digits (BCD),
  TA–TD = card serial.
"""

from __future__ import annotations

from dataclasses import dataclass

from apdu_specs import crypto

RID = bytes.fromhex("D156000005")


class IdentifierError(ValueError):
    """An identifier is malformed or its check character is wrong."""


# --- social security number ---------------------------------------------------------------------

_SSN_WEIGHTS = [pow(2, 17 - i, 11) for i in range(17)]


def ssn_check_char(body17: str) -> str:
    """ISO 7064 MOD 11-2 check character of the first 17 digits."""
    if len(body17) != 17 or not body17.isascii() or not body17.isdigit():
        raise IdentifierError("SSN body must be 17 digits")
    s = sum(int(c) * w for c, w in zip(body17, _SSN_WEIGHTS, strict=True))
    return "10X98765432"[s % 11]


def validate_ssn(ssn: str) -> None:
    if len(ssn) != 18:
        raise IdentifierError(f"SSN must be 18 characters, got {len(ssn)}")
    if ssn_check_char(ssn[:17]) != ssn[17].upper():
        raise IdentifierError("SSN check character is wrong")


def mask_ssn(ssn: str) -> str:
    """Mask for logs: first 4 and last 4 characters kept (``3702**********1237``)."""
    if len(ssn) <= 8:
        return "*" * len(ssn)
    return ssn[:4] + "*" * (len(ssn) - 8) + ssn[-4:]


def mask_name(name: str) -> str:
    """Mask for logs: the first character kept (``张*``)."""
    if not name:
        return name
    return name[0] + "*" * max(1, len(name) - 1)


# --- card number ------------------------------------------------------------------------------

_CARD_WEIGHTS = (3, 7, 9, 10, 5, 8, 4, 2)


def _char_value(c: str) -> int:
    if c.isdigit():
        return int(c)
    if "A" <= c <= "Z":
        return ord(c) - ord("A") + 10
    raise IdentifierError(f"card number character {c!r} is not a digit or capital letter")


def card_no_check_char(body8: str) -> str:
    if len(body8) != 8 or not body8.isascii():
        raise IdentifierError("card number body must be 8 characters")
    s = sum(_char_value(c) * w for c, w in zip(body8, _CARD_WEIGHTS, strict=True))
    c9 = 11 - s % 11
    return {10: "X", 11: "0"}.get(c9, str(c9))


def validate_card_no(card_no: str) -> None:
    if len(card_no) != 9:
        raise IdentifierError(f"card number must be 9 characters, got {len(card_no)}")
    if not "A" <= card_no[0] <= "Z":
        raise IdentifierError("card number must start with a capital letter")
    if card_no_check_char(card_no[:8]) != card_no[8]:
        raise IdentifierError("card number check character is wrong")


# --- card identification code -----------------------------------------------------------------


def card_id_auth_code(alg: crypto.Algorithm, irk_card: bytes, first12: bytes) -> bytes:
    """The 4-byte authentication code over bytes 1–12: MAC with the card's IRK, IV 0.

    The spec leaves the exact construction to the issuer's HSM (card-spec §2.8 says nothing at
    the pharmacy checks it); this project uses the §4.4 MAC keyed with the diversified IRK.
    """
    if len(first12) != 12:
        raise IdentifierError("card identification code body must be 12 bytes")
    return crypto.mac(alg, irk_card, first12)


def card_id_code(region: str, serial: bytes, auth: bytes) -> bytes:
    if len(region) != 6 or not region.isascii() or not region.isdigit():
        raise IdentifierError("region must be 6 digits")
    if len(serial) != 4 or len(auth) != 4:
        raise IdentifierError("serial and auth code are 4 bytes each")
    return bytes.fromhex(region) + RID + serial + auth


# --- ATR ----------------------------------------------------------------------------------------

ATR_PREFIX = bytes.fromhex("3B6D0000")
# T1–T7: chip-provider id, COS-vendor bytes, card-manufacturer id (card-spec §1 proposal).
DEFAULT_ATR_VENDOR = bytes.fromhex("00814A44468660")


@dataclass(frozen=True)
class Atr:
    """The contact ATR of card-spec §1: ``3B 6D 00 00`` + 13 historical bytes."""

    vendor: bytes  # T1..T7
    region4: str  # first 4 digits of the issuing region (T8..T9, BCD)
    serial: bytes  # TA..TD

    def encode(self) -> bytes:
        return ATR_PREFIX + self.historical

    @property
    def historical(self) -> bytes:
        return self.vendor + bytes.fromhex(self.region4) + self.serial

    @classmethod
    def for_card(cls, region: str, serial: bytes, vendor: bytes = DEFAULT_ATR_VENDOR) -> Atr:
        if len(vendor) != 7 or len(serial) != 4:
            raise IdentifierError("ATR vendor bytes are 7 and the serial 4 bytes")
        if len(region) < 4 or not region.isascii() or not region.isdigit():
            raise IdentifierError(f"region must be at least 4 digits, got {region!r}")
        return cls(vendor, region[:4], serial)

    @classmethod
    def parse(cls, atr: bytes) -> Atr:
        hist = historical_bytes(atr)
        if len(hist) != 13:
            raise IdentifierError(f"expected 13 historical bytes, got {len(hist)}")
        return cls(hist[:7], hist[7:9].hex().upper(), hist[9:13])


def historical_bytes(atr: bytes) -> bytes:
    """Historical bytes of any ISO 7816-3 ATR (walks the interface bytes)."""
    if len(atr) < 2 or atr[0] not in (0x3B, 0x3F):
        raise IdentifierError("not an ATR (TS must be 3B or 3F)")
    t0 = atr[1]
    k = t0 & 0x0F
    i = 2
    y = t0 >> 4
    while True:
        i += bin(y).count("1")
        if not y & 0x8:
            break
        if i > len(atr):
            raise IdentifierError("ATR truncated in its interface bytes")
        y = atr[i - 1] >> 4
    if i + k > len(atr):
        raise IdentifierError("ATR shorter than its historical bytes")
    return atr[i : i + k]
