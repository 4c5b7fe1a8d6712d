"""The card specification's algorithms (card-spec §4), shared by the card, the PSAM and the backend.

Two families:

* 8-byte block: single DES / two-key 3DES (E-D-E), algorithm id ``01`` in the SSSE FCI
  (generation-2 cards). Keys are 16 bytes (K1‖K2); a session key is 8 bytes (single DES).
* 16-byte block: SM4, algorithm id ``03`` (generation-3 cards). Keys and session keys are 16 bytes.

SSF33 (id ``02``) has no public implementation and is not supported.

``cryptography`` keeps TripleDES under ``hazmat.decrepit`` and warns on 16-byte keys, so
two-key 3DES is driven with K1‖K2‖K1 and single DES with K‖K‖K.
"""

from __future__ import annotations

import enum
import os

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, CipherAlgorithm, algorithms, modes


class CryptoError(ValueError):
    """Bad key length, block alignment or padding."""


class Algorithm(enum.IntEnum):
    """Algorithm identifier as the SSSE FCI announces it (tag ``9F0C/86``)."""

    DES3 = 0x01
    SSF33 = 0x02
    SM4 = 0x03

    @property
    def block_size(self) -> int:
        return 8 if self is Algorithm.DES3 else 16

    @property
    def label(self) -> str:
        return {Algorithm.DES3: "3DES", Algorithm.SSF33: "SSF33", Algorithm.SM4: "SM4"}[self]


KEY_LEN = 16  # every root and card key, both families


def _check_supported(alg: Algorithm) -> None:
    if alg is Algorithm.SSF33:
        raise CryptoError("SSF33 is not supported (no public implementation)")


# --- raw block ciphers -------------------------------------------------------------------------


def _des_key(key: bytes) -> bytes:
    if len(key) == 8:
        return key * 3
    if len(key) == 16:
        return key + key[:8]
    raise CryptoError(f"DES key must be 8 or 16 bytes, got {len(key)}")


def _algo(alg: Algorithm, key: bytes) -> CipherAlgorithm:
    _check_supported(alg)
    if alg is Algorithm.DES3:
        return TripleDES(_des_key(key))
    if len(key) != 16:
        raise CryptoError(f"SM4 key must be 16 bytes, got {len(key)}")
    return algorithms.SM4(key)


def ecb_encrypt(alg: Algorithm, key: bytes, data: bytes) -> bytes:
    if len(data) % alg.block_size:
        raise CryptoError(f"data length {len(data)} is not a multiple of {alg.block_size}")
    enc = Cipher(_algo(alg, key), modes.ECB()).encryptor()
    return enc.update(data) + enc.finalize()


def ecb_decrypt(alg: Algorithm, key: bytes, data: bytes) -> bytes:
    if len(data) % alg.block_size:
        raise CryptoError(f"data length {len(data)} is not a multiple of {alg.block_size}")
    dec = Cipher(_algo(alg, key), modes.ECB()).decryptor()
    return dec.update(data) + dec.finalize()


def cbc_encrypt(alg: Algorithm, key: bytes, data: bytes, iv: bytes | None = None) -> bytes:
    bs = alg.block_size
    if len(data) % bs:
        raise CryptoError(f"data length {len(data)} is not a multiple of {bs}")
    iv = iv if iv is not None else bytes(bs)
    if len(iv) != bs:
        raise CryptoError(f"IV must be {bs} bytes")
    enc = Cipher(_algo(alg, key), modes.CBC(iv)).encryptor()
    return enc.update(data) + enc.finalize()


# --- padding ------------------------------------------------------------------------------------


def pad_mac(data: bytes, block_size: int) -> bytes:
    """``80 00..`` to a block multiple; a full ``80 00..`` block when already aligned."""
    data = data + b"\x80"
    return data + bytes(-len(data) % block_size)


def pad_enc(data: bytes, block_size: int) -> bytes:
    """Encryption padding: unchanged when aligned, else ``80 00..`` to a block multiple."""
    if len(data) % block_size == 0:
        return data
    return pad_mac(data, block_size)


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def _invert(b: bytes) -> bytes:
    return bytes(x ^ 0xFF for x in b)


# --- §4.2 session keys, authentication --------------------------------------------------------


def session_key(alg: Algorithm, key: bytes, rnd: bytes) -> bytes:
    """Process key from a card/root key and a random (right-padded with ``00``)."""
    bs = alg.block_size
    if not 4 <= len(rnd) <= bs:
        raise CryptoError(f"session input must be 4..{bs} bytes, got {len(rnd)}")
    return ecb_encrypt(alg, key, rnd.ljust(bs, b"\x00"))


def auth_data(alg: Algorithm, key: bytes, rnd: bytes, plain: bytes) -> bytes:
    """INTERNAL/EXTERNAL AUTHENTICATE cryptogram: 8 bytes over ``plain`` (8 bytes)."""
    return auth_from_session(alg, session_key(alg, key, rnd), plain)


def auth_from_session(alg: Algorithm, sk: bytes, plain: bytes) -> bytes:
    """The same cryptogram from an already derived session key (the PSAM's CIPHER DATA path)."""
    if len(plain) != 8:
        raise CryptoError(f"authentication plain data must be 8 bytes, got {len(plain)}")
    if alg is Algorithm.DES3:
        return ecb_encrypt(alg, sk, plain)
    out = ecb_encrypt(alg, sk, plain + bytes(8))
    return _xor(out[:8], out[8:])


# --- §4.4 secure messaging ----------------------------------------------------------------------


def mac(alg: Algorithm, sk: bytes, msg: bytes, iv: bytes | None = None) -> bytes:
    """4-byte MAC: CBC over ``padM(msg)``; DES → left 4 bytes, SM4 → XOR of the 4 words."""
    last = cbc_encrypt(alg, sk, pad_mac(msg, alg.block_size), iv)[-alg.block_size :]
    if alg is Algorithm.DES3:
        return last[:4]
    return _xor(_xor(last[0:4], last[4:8]), _xor(last[8:12], last[12:16]))


def encrypt(alg: Algorithm, sk: bytes, plain: bytes) -> bytes:
    """``ECB(LD ‖ plain ‖ 80 00..)`` (LD = plaintext length, one byte)."""
    if len(plain) > 255:
        raise CryptoError("plaintext longer than 255 bytes")
    return ecb_encrypt(alg, sk, pad_enc(bytes([len(plain)]) + plain, alg.block_size))


def decrypt(alg: Algorithm, sk: bytes, data: bytes) -> bytes:
    """Inverse of :func:`encrypt`; checks LD and the padding."""
    if not data or len(data) % alg.block_size:
        raise CryptoError("ciphertext length is not a positive block multiple")
    raw = ecb_decrypt(alg, sk, data)
    ld = raw[0]
    if ld + 1 > len(raw):
        raise CryptoError("length byte exceeds the ciphertext")
    plain = raw[1 : 1 + ld]
    if pad_enc(raw[: 1 + ld], alg.block_size) != raw:
        raise CryptoError("bad padding")
    return plain


# --- §4.3 key diversification -------------------------------------------------------------------


def diversify(alg: Algorithm, key: bytes, factor: bytes) -> bytes:
    """One level of diversification: 16-byte sub-key from a key and an 8-byte factor."""
    if len(factor) != 8:
        raise CryptoError(f"diversification factor must be 8 bytes, got {len(factor)}")
    if alg is Algorithm.DES3:
        return ecb_encrypt(alg, key, factor) + ecb_encrypt(alg, key, _invert(factor))
    return ecb_encrypt(alg, key, factor + _invert(factor))


def province_factor(region: str) -> bytes:
    """Level-1 factor: ASCII of the first two region digits + ``30303030 7368``."""
    _check_region(region)
    return region[:2].encode("ascii") + b"0000sh"


def city_factor(region: str) -> bytes:
    """Level-2 factor: ASCII of the 6-digit region + ``7378``; Zhejiang (33…) uses 4 digits."""
    _check_region(region)
    if region.startswith("33"):
        return region[:4].encode("ascii") + b"00sx"
    return region.encode("ascii") + b"sx"


def card_factor(historical_bytes: bytes) -> bytes:
    """Level-3 factor: ATR historical bytes 6..13 (T6..TD)."""
    if len(historical_bytes) != 13:
        raise CryptoError(f"expected 13 historical bytes, got {len(historical_bytes)}")
    return historical_bytes[5:13]


def diversification_factors(region: str, historical_bytes: bytes) -> list[bytes]:
    """Factors from the national root down to the card key: [province, city, card]."""
    return [province_factor(region), city_factor(region), card_factor(historical_bytes)]


def derive(alg: Algorithm, root: bytes, factors: list[bytes]) -> bytes:
    """Apply the diversification chain (national → province → city → card)."""
    key = root
    for f in factors:
        key = diversify(alg, key, f)
    return key


def _check_region(region: str) -> None:
    if len(region) != 6 or not region.isascii() or not region.isdigit():
        raise CryptoError(f"region code must be 6 digits, got {region!r}")


# --- PIN encodings -----------------------------------------------------------------------------


def pin_to_bcd(pin: str) -> bytes:
    """PIN digits as BCD, an odd length padded with nibble ``F`` (VERIFY, CHANGE PIN, reload)."""
    if not pin.isascii() or not pin.isdigit():
        raise CryptoError("PIN must consist of digits")
    if len(pin) % 2:
        pin += "F"
    return bytes.fromhex(pin)


def bcd_to_pin(data: bytes) -> str:
    """Inverse of :func:`pin_to_bcd`; only a final ``F`` nibble is allowed as padding."""
    digits = data.hex().upper()
    if digits.endswith("F"):
        digits = digits[:-1]
    if not digits.isdigit():
        raise CryptoError("PIN block holds a non-digit nibble")
    return digits


def reload_pin_block(pin: str) -> bytes:
    """Plaintext of the 84 24 reload command: the PIN as BCD (LD is added by :func:`encrypt`)."""
    return pin_to_bcd(pin)


def random_bytes(n: int) -> bytes:
    return os.urandom(n)


# --- ISO 9564-1 format 4 (AES) PIN block -------------------------------------------------------


def iso9564_format4_encipher(key: bytes, pin: str, pan: str, rnd: bytes | None = None) -> bytes:
    """Encipher a PIN in an ISO 9564-1:2017 format 4 PIN block under an AES key.

    ``pan`` is the account field: here the first 17 digits of the social security number
    (architecture.md), any 12..19 digits in general.
    """
    if not pin.isascii() or not pin.isdigit() or not 4 <= len(pin) <= 12:
        raise CryptoError("PIN must be 4..12 digits")
    if not pan.isascii() or not pan.isdigit() or not 12 <= len(pan) <= 19:
        raise CryptoError("account field must be 12..19 digits")
    if len(key) not in (16, 24, 32):
        raise CryptoError("AES key must be 16, 24 or 32 bytes")
    pin_field = bytes.fromhex(("4" + f"{len(pin):X}" + pin).ljust(16, "A")) + (
        rnd if rnd is not None else os.urandom(8)
    )
    if len(pin_field) != 16:
        raise CryptoError("random fill must be 8 bytes")
    m = len(pan) - 12
    pan_field = bytes.fromhex(f"{m:X}" + pan.ljust(31, "0"))
    aes = Cipher(algorithms.AES(key), modes.ECB())
    enc = aes.encryptor()
    inter = enc.update(pin_field)
    enc2 = aes.encryptor()
    return enc2.update(_xor(inter, pan_field)) + enc2.finalize()


def iso9564_format4_decipher(key: bytes, block: bytes, pan: str) -> str:
    """Recover the PIN from a format 4 PIN block; ``CryptoError`` on any inconsistency."""
    if len(block) != 16:
        raise CryptoError("format 4 PIN block must be 16 bytes")
    if not pan.isascii() or not pan.isdigit() or not 12 <= len(pan) <= 19:
        raise CryptoError("account field must be 12..19 digits")
    if len(key) not in (16, 24, 32):
        raise CryptoError("AES key must be 16, 24 or 32 bytes")
    aes = Cipher(algorithms.AES(key), modes.ECB())
    dec = aes.decryptor()
    inter = dec.update(block)
    m = len(pan) - 12
    pan_field = bytes.fromhex(f"{m:X}" + pan.ljust(31, "0"))
    dec2 = aes.decryptor()
    pin_field = (dec2.update(_xor(inter, pan_field)) + dec2.finalize()).hex().upper()
    if pin_field[0] != "4":
        raise CryptoError("not a format 4 PIN block")
    n = int(pin_field[1], 16)
    if not 4 <= n <= 12:
        raise CryptoError("PIN block states an invalid PIN length")
    pin = pin_field[2 : 2 + n]
    if not pin.isdigit() or set(pin_field[2 + n : 16]) - {"A"}:
        raise CryptoError("PIN block has bad digits or fill")
    return pin
