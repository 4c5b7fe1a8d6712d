"""The emulated PSAM (terminal security module, card-spec §3.5).

Two key environments, as on a real PSAM: the 8-byte-algorithm (3DES) environment under the MF
``3F00`` named ``sx1.sh.社会保障``, and the 16-byte-algorithm (SM4 here) environment under DDF
``DDF1`` named ``sx2.sh.社会保障``. Each holds the application ``DF01`` (AID ``D15600000590``).
Files ``0015`` (card info, 15 bytes) and ``0016`` (terminal number, 6 bytes BCD) sit under the
MF; ``0019`` (terminal transaction counter) under the application.

The terminal uses it like this (the daemon's card session does exactly this):

1. SELECT the environment matching the card's algorithm, then the application by AID.
2. DELIVERY SESSION KEY ``BF DE <usage> <key id>``, data = diversification factors from the card
   level up (card, city, province; 8 bytes each, N = usage b8–b6) ‖ session input (8 or 16
   bytes). The PSAM diversifies its root key down to the card key and derives the session key.
3. CIPHER DATA ``80 FA <P1> 00``: ``00``/``02`` ECB-encrypt block-aligned data (single / more),
   ``05`` MAC of the data (IV 0), ``07`` first MAC part (IV ‖ data), ``03`` next part, ``01`` last
   part → the 4-byte MAC. Single and last operations end the session key.

Key ids (P2) are this project's (README, "PSAM key ids"): the PSAM holds only the root keys it was
issued with, so a pharmacy PSAM without PUK rights answers ``6A88`` to a PUK request.
"""

from __future__ import annotations

from apdu_specs import apdu as A
from apdu_specs import crypto, filesystem
from apdu_specs.apdu import CommandApdu
from apdu_specs.crypto import Algorithm
from apdu_specs.psam import (
    ENV_ALG,
    ENV_FIDS,
    ENV_NAMES,
    PSAM_AID,
    USAGE_MAC_ENC,
)
from apdu_specs.status import SW, StatusWordError
from firmware_sim.cos import Cos, LePolicy, ResponseMode, check_lc, check_p1p2, read_slice
from firmware_sim.image import PsamImage
from firmware_sim.store import TearSafeStore


def psam_atr(serial: str) -> bytes:
    """``3B 6A 00 00`` + 10 historical bytes: ``50 53 41 4D`` ("PSAM") + last 12 serial digits."""
    return bytes.fromhex("3B6A0000") + b"PSAM" + bytes.fromhex(serial[-12:])


def _fail(sw: int) -> StatusWordError:
    return StatusWordError(sw)


class Psam(Cos):
    def __init__(self, image: PsamImage, store: TearSafeStore | None = None,
                 mode: ResponseMode = ResponseMode.DIRECT):
        super().__init__(mode)
        self.image = image
        self.store = store
        self.env: str | None = None
        self.in_app = False
        self.cur_file: int | None = None
        self.session: bytes | None = None
        self.mac_chain: tuple[bytes, bytes] | None = None  # (iv, pending bytes)
        self._reset_volatile()
        r = self.register
        r(A.SELECT, self._select)
        r(A.READ_BINARY, self._read_binary, LePolicy.HANDLER)
        r(A.GET_CHALLENGE, self._get_challenge, LePolicy.HANDLER)
        r(A.INITIALIZE_ENVIRONMENT, self._init_env)
        r(A.DELIVERY_SESSION_KEY, self._delivery_session_key)
        r(A.CIPHER_DATA, self._cipher_data)

    @property
    def atr(self) -> bytes:
        return self.image.atr

    def _reset_volatile(self) -> None:
        super()._reset_volatile()
        self.env = "des3"
        self.in_app = False
        self.cur_file = None
        self.session = None
        self.mac_chain = None

    @property
    def alg(self) -> Algorithm:
        return ENV_ALG[self.env or "des3"]

    # -- files ----------------------------------------------------------------------------------

    def _files(self) -> dict[int, bytes]:
        if self.in_app:
            return {0x0019: self.image.counter.to_bytes(4, "big")}
        serial = bytes.fromhex(self.image.serial)
        return {
            0x0015: bytes((0x01,)) + serial + bytes((0x01, 0x01)) + b"\x00\x00",
            0x0016: bytes.fromhex(self.image.terminal_no),
        }

    def _select(self, apdu: CommandApdu) -> bytes:
        if apdu.p2 not in (0x00, 0x0C):
            raise _fail(SW.WRONG_P1P2)
        fci = apdu.p2 == 0x00
        if apdu.p1 == A.SELECT_BY_NAME:
            if not 5 <= len(apdu.data) <= 16:
                raise _fail(SW.WRONG_LENGTH)
            for env, name in ENV_NAMES.items():
                if apdu.data == name:
                    return self._enter_env(env, fci)
            if apdu.data == PSAM_AID:
                return self._enter_app(fci)
            raise _fail(SW.FILE_NOT_FOUND)
        if apdu.p1 in (A.SELECT_BY_FID, A.SELECT_EF):
            if apdu.p1 == A.SELECT_BY_FID and not apdu.data:
                return self._enter_env("des3", fci)
            check_lc(apdu, 2)
            fid = int.from_bytes(apdu.data, "big")
            if apdu.p1 == A.SELECT_BY_FID:
                for env, efid in ENV_FIDS.items():
                    if fid == efid:
                        return self._enter_env(env, fci)
                if fid == 0xDF01:
                    return self._enter_app(fci)
            if fid in self._files():
                self.cur_file = fid
                return b""
            raise _fail(SW.FILE_NOT_FOUND)
        raise _fail(SW.WRONG_P1P2)

    def _enter_env(self, env: str, fci: bool) -> bytes:
        self.env, self.in_app, self.cur_file = env, False, None
        self.session = None
        self.mac_chain = None
        return filesystem.fci_ddf(ENV_NAMES[env], None) if fci else b""

    def _enter_app(self, fci: bool) -> bytes:
        self.in_app, self.cur_file = True, None
        return filesystem.fci_adf(PSAM_AID) if fci else b""

    def _read_binary(self, apdu: CommandApdu) -> bytes:
        if apdu.data:
            raise _fail(SW.WRONG_LENGTH)
        files = self._files()
        if apdu.p1 & 0x80:
            fid = apdu.p1 & 0x1F
            if fid not in files:
                raise _fail(SW.FILE_NOT_FOUND)
            self.cur_file, offset = fid, apdu.p2
        else:
            if self.cur_file is None or self.cur_file not in files:
                raise _fail(SW.NO_CURRENT_EF)
            offset = (apdu.p1 << 8) | apdu.p2
        return read_slice(files[self.cur_file], offset, apdu.le)

    # -- crypto ---------------------------------------------------------------------------------

    def _init_env(self, apdu: CommandApdu) -> bytes:
        check_p1p2(apdu, 0, 0)
        check_lc(apdu, 1)
        return b""

    def _key_by_id(self, key_id: int) -> bytes:
        env = self.env or "des3"
        for entry in self.image.keys.get(env, {}).values():
            if entry.key_id == key_id:
                return entry.value
        raise _fail(SW.REFERENCE_NOT_FOUND)

    def _delivery_session_key(self, apdu: CommandApdu) -> bytes:
        if not self.in_app:
            raise _fail(SW.CONDITIONS_NOT_SATISFIED)
        levels = apdu.p1 >> 5
        if apdu.p1 & 0x1F not in (6, 7, USAGE_MAC_ENC):
            raise _fail(SW.WRONG_P1P2)
        bs = self.alg.block_size
        if len(apdu.data) != 8 * levels + bs:
            raise _fail(SW.WRONG_LENGTH)
        root = self._key_by_id(apdu.p2)
        factors = [apdu.data[i * 8 : i * 8 + 8] for i in range(levels)]
        card_key = crypto.derive(self.alg, root, list(reversed(factors)))
        self.session = crypto.session_key(self.alg, card_key, apdu.data[8 * levels :])
        self.mac_chain = None
        return b""

    def _cipher_data(self, apdu: CommandApdu) -> bytes:
        if apdu.p2 != 0:
            raise _fail(SW.WRONG_P1P2)
        sk = self.session
        if sk is None:
            raise _fail(SW.CONDITIONS_NOT_SATISFIED)
        bs = self.alg.block_size
        op, data = apdu.p1, apdu.data
        if not data:
            raise _fail(SW.WRONG_LENGTH)
        if op in (A.CIPHER_ENC, A.CIPHER_ENC_MORE):
            if len(data) % bs:
                raise _fail(SW.WRONG_LENGTH)
            out = crypto.ecb_encrypt(self.alg, sk, data)
            if op == A.CIPHER_ENC:
                self.session = None
            return out
        if op == A.CIPHER_MAC:
            self.session = None
            return crypto.mac(self.alg, sk, data)
        if op == A.CIPHER_MAC_FIRST:
            if len(data) < bs or (len(data) - bs) % bs:
                raise _fail(SW.WRONG_LENGTH)
            self.mac_chain = (data[:bs], data[bs:])
            return b""
        if op in (A.CIPHER_MAC_NEXT, A.CIPHER_MAC_LAST):
            if self.mac_chain is None:
                raise _fail(SW.CONDITIONS_NOT_SATISFIED)
            iv, acc = self.mac_chain
            if op == A.CIPHER_MAC_NEXT:
                if len(data) % bs:
                    raise _fail(SW.WRONG_LENGTH)
                self.mac_chain = (iv, acc + data)
                return b""
            self.mac_chain = None
            self.session = None
            return crypto.mac(self.alg, sk, acc + data, iv)
        raise _fail(SW.WRONG_P1P2)
