"""The terminal side of the PSAM: card authentication, external-authentication cryptograms, write
MACs and the terminal number (card-spec §3.5; key ids and environments in :mod:`apdu_specs.psam`).

A :class:`PsamClient` wraps the reader that holds the PSAM. Its methods are synchronous and are
called from inside a card operation (the card reader's worker thread); each PSAM conversation is
one :meth:`~sscardd.readers.base.Reader.call_blocking` into the PSAM reader's own thread.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from apdu_specs import apdu as A
from apdu_specs import crypto
from apdu_specs.crypto import Algorithm
from apdu_specs.psam import ALG_ENV, ENV_NAMES, PSAM_AID, PSAM_KEY_IDS, TERMINAL_NO_SFI, usage_byte
from sscardd.errors import SSCardError
from sscardd.readers.base import CardLink, Reader
from sscardd.transport import Exchanger, TraceHook

PSAM_TIMEOUT = 10.0  # seconds a card operation waits for the PSAM reader
# Failures of the PSAM's reader (not of the user card) all mean: no usable PSAM.
_READER_FAILURES = frozenset({"NO_CARD", "CARD_REMOVED", "READER_GONE", "READER_NOT_CONNECTED",
                              "READER_UNAVAILABLE", "CARD_NO_ANSWER", "CARD_GARBAGE",
                              "READER_CHECKSUM"})
SW_KEY_NOT_FOUND = 0x6A88
SW_FILE_NOT_FOUND = 0x6A82
T = TypeVar("T")


@dataclass(frozen=True)
class CardRef:
    """What the PSAM needs to diversify a root key down to this card's key."""

    alg: Algorithm
    region: str  # 6 digits: the card identification code's region
    historical: bytes  # the ATR's 13 historical bytes

    @property
    def factors_card_first(self) -> bytes:
        return b"".join(reversed(crypto.diversification_factors(self.region, self.historical)))


class PsamClient:
    def __init__(self, reader: Reader, trace: TraceHook | None = None):
        self.reader = reader
        self.trace = trace
        self._terminal_no: str | None = None

    # -- helpers --------------------------------------------------------------------------------

    def _call(self, op: Callable[[CardLink], T]) -> T:
        try:
            return self.reader.call_blocking(op, timeout=PSAM_TIMEOUT)
        except SSCardError as exc:
            if exc.code in _READER_FAILURES:
                raise SSCardError("NO_PSAM", f"PSAM reader: {exc.code}",
                                  reader=self.reader.name) from None
            raise

    def _exchange(self, link: CardLink) -> Exchanger:
        return Exchanger(link, "psam", self.trace)

    def _enter(self, ex: Exchanger, alg: Algorithm) -> None:
        env = ALG_ENV.get(alg)
        if env is None:
            raise SSCardError("PSAM_NO_ALGORITHM", alg.label)
        r = ex.send(A.select_aid(ENV_NAMES[env], fci=False))
        if r.sw == SW_FILE_NOT_FOUND:
            raise SSCardError("PSAM_NO_ALGORITHM", alg.label)
        if r.sw != 0x9000:
            raise SSCardError("NO_PSAM", f"PSAM refused its environment: {r.sw:04X}")
        r = ex.send(A.select_aid(PSAM_AID, fci=False))
        if r.sw != 0x9000:
            raise SSCardError("NO_PSAM", f"no PSAM application: {r.sw:04X}")

    def _session(self, ex: Exchanger, card: CardRef, key: str, session_input: bytes) -> None:
        key_id = PSAM_KEY_IDS.get(key)
        if key_id is None:
            raise SSCardError("PSAM_KEY_LEVEL", key)
        data = card.factors_card_first + session_input.ljust(card.alg.block_size, b"\x00")
        r = ex.send(A.DELIVERY_SESSION_KEY.build(usage_byte(3), key_id, data))
        if r.sw == SW_KEY_NOT_FOUND:
            raise SSCardError("PSAM_NO_RKSSSE" if key == "RKSSSE" else "PSAM_KEY_LEVEL", key)
        if r.sw != 0x9000:
            raise SSCardError("BAD_CALCULATION_DATA", f"DELIVERY SESSION KEY {r.sw:04X}")

    def _cipher(self, ex: Exchanger, p1: int, data: bytes) -> bytes:
        r = ex.send(A.CIPHER_DATA.build(p1, 0, data, le=256))
        if r.sw != 0x9000:
            raise SSCardError("BAD_CALCULATION_DATA", f"CIPHER DATA {r.sw:04X}")
        return r.data

    # -- operations ---------------------------------------------------------------------------

    def terminal_number(self) -> str:
        """The 12-digit terminal number in PSAM file 0016 (the daemon's terminal id)."""
        if self._terminal_no is None:
            def op(link: CardLink) -> str:
                ex = self._exchange(link)
                r = ex.send(A.select_fid(0x3F00, A.SELECT_BY_FID))
                if r.sw != 0x9000:
                    raise SSCardError("NO_PSAM", f"SELECT MF {r.sw:04X}")
                r = ex.send(A.READ_BINARY.build(0x80 | TERMINAL_NO_SFI, 0, le=6))
                if r.sw != 0x9000 or len(r.data) != 6:
                    raise SSCardError("NO_PSAM", f"terminal number unreadable: {r.sw:04X}")
                digits = r.data.hex()
                if not digits.isdigit():
                    raise SSCardError("NO_PSAM", "terminal number is not BCD")
                return digits

            self._terminal_no = self._call(op)
        return self._terminal_no

    def auth_cryptogram(self, card: CardRef, key: str, session_input: bytes, plain: bytes) -> bytes:
        """The 8-byte INTERNAL/EXTERNAL AUTHENTICATE cryptogram under the card's ``key``."""

        def op(link: CardLink) -> bytes:
            ex = self._exchange(link)
            self._enter(ex, card.alg)
            self._session(ex, card, key, session_input)
            if card.alg is Algorithm.DES3:
                out = self._cipher(ex, A.CIPHER_ENC, plain)
                if len(out) != 8:
                    raise SSCardError("BAD_CALCULATION_DATA", "PSAM answer length")
                return out
            out = self._cipher(ex, A.CIPHER_ENC, plain + bytes(8))
            if len(out) != 16:
                raise SSCardError("BAD_CALCULATION_DATA", "PSAM answer length")
            return bytes(a ^ b for a, b in zip(out[:8], out[8:], strict=True))

        return self._call(op)

    def mac(self, card: CardRef, key: str, session_input: bytes, message: bytes) -> bytes:
        """The 4-byte secure-messaging MAC of ``message`` under the card's ``key``."""

        def op(link: CardLink) -> bytes:
            ex = self._exchange(link)
            self._enter(ex, card.alg)
            self._session(ex, card, key, session_input)
            out = self._cipher(ex, A.CIPHER_MAC, message)
            if len(out) != 4:
                raise SSCardError("BAD_CALCULATION_DATA", "PSAM MAC length")
            return out

        return self._call(op)

    def encrypt_mac(self, card: CardRef, key: str, session_input: bytes, header: bytes,
                    plain: bytes) -> bytes:
        """The data field of a secure-messaging command carrying a secret (card-spec §4.4, e.g.
        the 84 24 PIN reload): ``enc ‖ MAC``, both under one session key of the card's ``key``.

        ``enc`` = ECB(LD ‖ ``plain`` ‖ ``80 00..``); the MAC covers ``header`` (CLA INS P1 P2) ‖
        Lc ‖ ``enc`` with Lc = len(enc) + 4. The plaintext only travels in CIPHER DATA, whose
        body the APDU trace never logs."""
        if len(header) != 4:
            raise ValueError("header is CLA INS P1 P2")

        def op(link: CardLink) -> bytes:
            ex = self._exchange(link)
            self._enter(ex, card.alg)
            self._session(ex, card, key, session_input)
            block = crypto.pad_enc(bytes((len(plain),)) + plain, card.alg.block_size)
            enc = self._cipher(ex, A.CIPHER_ENC, block)
            if len(enc) != len(block):
                raise SSCardError("BAD_CALCULATION_DATA", "PSAM answer length")
            # A single operation ends the session key; the same inputs give the same key again.
            self._session(ex, card, key, session_input)
            mac = self._cipher(ex, A.CIPHER_MAC, header + bytes((len(enc) + 4,)) + enc)
            if len(mac) != 4:
                raise SSCardError("BAD_CALCULATION_DATA", "PSAM MAC length")
            return enc + mac

        return self._call(op)

    def probe(self) -> str:
        """Check that this reader holds a PSAM (it answers SELECT of the PSAM application
        D15600000590); returns its terminal number."""

        def op(link: CardLink) -> None:
            r = self._exchange(link).send(A.select_aid(PSAM_AID, fci=False))
            if r.sw != 0x9000:
                raise SSCardError("NO_PSAM", f"no PSAM application: {r.sw:04X}")

        self._call(op)
        self._terminal_no = None
        return self.terminal_number()
