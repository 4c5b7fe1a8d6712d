"""Command and response APDUs, and every command of the card (card-spec §3.1) and PSAM (§3.5).

``CommandApdu.parse`` decodes the ISO 7816-4 short cases (1, 2, 3, 4) strictly; a malformed
APDU raises :class:`ApduFormatError` with the status word a card answers (``6700``).
Extended-length APDUs are not used by these cards and are refused the same way.

Each command is declared once as a :class:`CommandSpec`: CLA, INS, and ``construct`` layouts for
its data field and its response. The emulator dispatches on the same table (by CLA/INS); the
daemon builds its commands with :meth:`CommandSpec.build`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import construct as cs

from apdu_specs.status import SW


class ApduFormatError(ValueError):
    """A command APDU that cannot be decoded; ``sw`` is what a card answers."""

    def __init__(self, message: str, sw: int = SW.WRONG_LENGTH):
        super().__init__(message)
        self.sw = sw


@dataclass(frozen=True, slots=True)
class CommandApdu:
    cla: int
    ins: int
    p1: int
    p2: int
    data: bytes = b""
    le: int | None = None  # None: absent; otherwise 1..256 (a coded 00 is 256)

    @classmethod
    def parse(cls, raw: bytes) -> CommandApdu:
        n = len(raw)
        if n < 4:
            raise ApduFormatError(f"APDU of {n} bytes is shorter than its header")
        cla, ins, p1, p2 = raw[0], raw[1], raw[2], raw[3]
        if n == 4:  # case 1
            return cls(cla, ins, p1, p2)
        b = raw[4]
        if n == 5:  # case 2: Le
            return cls(cla, ins, p1, p2, b"", b or 256)
        if b == 0:
            raise ApduFormatError("extended-length APDUs are not supported")
        if n == 5 + b:  # case 3
            return cls(cla, ins, p1, p2, raw[5:])
        if n == 6 + b:  # case 4
            return cls(cla, ins, p1, p2, raw[5 : 5 + b], raw[-1] or 256)
        raise ApduFormatError(f"Lc={b} does not match an APDU of {n} bytes")

    def encode(self) -> bytes:
        out = bytearray((self.cla, self.ins, self.p1, self.p2))
        if self.data:
            if len(self.data) > 255:
                raise ApduFormatError("data longer than 255 bytes")
            out.append(len(self.data))
            out += self.data
        if self.le is not None:
            if not 1 <= self.le <= 256:
                raise ApduFormatError("Le must be 1..256")
            out.append(self.le & 0xFF)
        return bytes(out)

    @property
    def secure_messaging(self) -> bool:
        return bool(self.cla & 0x04)

    def __str__(self) -> str:  # bytes inside, hex at the edges
        return self.encode().hex(" ").upper()


@dataclass(frozen=True, slots=True)
class ResponseApdu:
    data: bytes
    sw: int

    @classmethod
    def parse(cls, raw: bytes) -> ResponseApdu:
        if len(raw) < 2:
            raise ApduFormatError(f"response of {len(raw)} bytes has no status word",
                                  SW.NO_PRECISE_DIAGNOSIS)
        return cls(raw[:-2], (raw[-2] << 8) | raw[-1])

    def encode(self) -> bytes:
        return self.data + self.sw.to_bytes(2, "big")

    @property
    def sw1(self) -> int:
        return self.sw >> 8

    @property
    def sw2(self) -> int:
        return self.sw & 0xFF


# --- command declarations -----------------------------------------------------------------------


@dataclass(frozen=True)
class CommandSpec:
    """One command: header, body and response layouts (``None`` when absent/free-form)."""

    name: str
    cla: int
    ins: int
    target: str = "card"  # "card" | "psam" | "both"
    data: cs.Construct | None = None
    response: cs.Construct | None = None
    doc: str = ""

    def build(self, p1: int = 0, p2: int = 0, data: Any = None, le: int | None = None,
              cla: int | None = None) -> CommandApdu:
        """A command APDU; ``data`` is a dict for the declared layout, or raw bytes."""
        if isinstance(data, bytes | bytearray):
            body = bytes(data)
        elif data is None:
            body = b""
        elif self.data is not None:
            body = self.data.build(data)
        else:
            raise TypeError(f"{self.name} has no data layout; pass bytes")
        return CommandApdu(self.cla if cla is None else cla, self.ins, p1, p2, body, le)

    def parse_data(self, data: bytes) -> Any:
        if self.data is None:
            return data
        return self.data.parse(data)

    def parse_response(self, data: bytes) -> Any:
        if self.response is None:
            return data
        return self.response.parse(data)


# Bodies ------------------------------------------------------------------------------------------
AuthBody = cs.Struct(  # INTERNAL / EXTERNAL AUTHENTICATE
    "first" / cs.Bytes(8),  # internal: session input; external: auth data
    "second" / cs.Bytes(8),  # plain data
    "key_version" / cs.Optional(cs.Int8ub),
)
AuthResponse = cs.Struct("auth_data" / cs.Bytes(8))
# CHANGE PIN 80 5E 01 00: old ‖ FF ‖ new, each BCD (F-padded to whole bytes)
ChangePinBody = cs.GreedyBytes
# 84 24 reload: enc(LD ‖ PIN) ‖ MAC(4); unblock: MAC(4)
MacOnlyBody = cs.Struct("mac" / cs.Bytes(4))
# PSAM ------------------------------------------------------------------------------------------
DeliverySessionKeyBody = cs.GreedyBytes  # factors (8×N) ‖ session input (8 or 16)
InitEnvironmentBody = cs.Struct("card_id_first" / cs.Int8ub)
PsamTerminalInfo = cs.Struct("terminal_no" / cs.Bytes(6))  # file 0016, cn 12 digits
PsamCardInfo = cs.Struct(  # file 0015, 15 bytes
    "issuer_id" / cs.Int8ub,
    "serial" / cs.Bytes(10),
    "version" / cs.Int8ub,
    "key_card_type" / cs.Int8ub,
    "fci" / cs.Bytes(2),
)
PsamCounter = cs.Struct("counter" / cs.Int32ub)  # file 0019

SELECT = CommandSpec("SELECT", 0x00, 0xA4, "both", doc="P1 00 FID/MF, 02 EF, 04 by name")
READ_BINARY = CommandSpec("READ BINARY", 0x00, 0xB0, "both")
READ_RECORD = CommandSpec("READ RECORD", 0x00, 0xB2)
UPDATE_BINARY = CommandSpec("UPDATE BINARY", 0x00, 0xD6)
UPDATE_RECORD = CommandSpec("UPDATE RECORD", 0x00, 0xDC)
VERIFY = CommandSpec("VERIFY", 0x00, 0x20, doc="no data: query")
CHANGE_PIN = CommandSpec("CHANGE PIN", 0x80, 0x5E, data=ChangePinBody)
PIN_UNBLOCK_RELOAD = CommandSpec("PIN UNBLOCK/RELOAD", 0x84, 0x24, doc="P2 00 unblock, 01 reload")
GET_CHALLENGE = CommandSpec("GET CHALLENGE", 0x00, 0x84, "both")
INTERNAL_AUTHENTICATE = CommandSpec("INTERNAL AUTHENTICATE", 0x00, 0x88, data=AuthBody,
                                    response=AuthResponse)
EXTERNAL_AUTHENTICATE = CommandSpec("EXTERNAL AUTHENTICATE", 0x00, 0x82, "both", data=AuthBody)
GET_RESPONSE = CommandSpec("GET RESPONSE", 0x00, 0xC0, "both")
APPLICATION_BLOCK = CommandSpec("APPLICATION BLOCK", 0x84, 0x1E, data=MacOnlyBody)
CARD_BLOCK = CommandSpec("CARD BLOCK", 0x84, 0x16, data=MacOnlyBody)
# PSAM
INITIALIZE_ENVIRONMENT = CommandSpec("INITIALIZE ENVIRONMENT", 0xBF, 0xEC, "psam",
                                     data=InitEnvironmentBody)
DELIVERY_SESSION_KEY = CommandSpec("DELIVERY SESSION KEY", 0xBF, 0xDE, "psam",
                                   data=DeliverySessionKeyBody,
                                   doc="P1 key usage (b8-b6 levels, b5-b1 type), P2 key id")
CIPHER_DATA = CommandSpec("CIPHER DATA", 0x80, 0xFA, "psam",
                          doc="P1 00 enc, 02 enc more, 05 MAC, 07 MAC first, 03 next, 01 last")

# PSAM key management and the offline-purchase pair (card-spec §3.5). Declared for completeness
# of the shared vocabulary; the emulated PSAM is personalised by `sscard-emu issue` instead of
# CREATE/CHANGE KEY, and networked settlement does not use the purchase pair.
KeyRecordBody = cs.Struct(
    "usage" / cs.Int8ub,  # b8-b6 diversification levels, b5-b1 key type
    "key_id" / cs.Int8ub,
    "version" / cs.Int8ub,
    "algorithm" / cs.Int8ub,  # 00 3DES 16 B, 01 DES 8 B, 02 SSF33 16 B
    "key" / cs.GreedyBytes,  # enciphered under the PSAM's transport key
)
InitSamForPurchaseBody = cs.Struct(
    "card_random" / cs.Bytes(4),
    "card_seq" / cs.Int16ub,
    "account_amount" / cs.Int32ub,
    "self_pay_amount" / cs.Int32ub,
    "fund_amount" / cs.Int32ub,
    "txn_type" / cs.Int8ub,
    "date" / cs.Bytes(4),  # YYYYMMDD, BCD
    "time" / cs.Bytes(3),  # hhmmss, BCD
    "key_version" / cs.Int8ub,
    "algorithm" / cs.Int8ub,
    "factors" / cs.GreedyBytes,  # 8 × N: third, second, first level
)
InitSamForPurchaseResponse = cs.Struct("terminal_seq" / cs.Int32ub, "mac1" / cs.Bytes(4))
PSAM_EXTERNAL_AUTHENTICATE = CommandSpec("PSAM EXTERNAL AUTHENTICATE", 0x00, 0x82, "psam",
                                         data=AuthBody)
CREATE_KEY = CommandSpec("CREATE KEY", 0x84, 0xD4, "psam", data=KeyRecordBody,
                         doc="P1 00, P2 key file")
CHANGE_KEY = CommandSpec("CHANGE KEY", 0x84, 0xD4, "psam", data=KeyRecordBody,
                         doc="P1 01, P2 key file (same INS as CREATE KEY)")
INIT_SAM_FOR_PURCHASE = CommandSpec("INIT SAM FOR PURCHASE", 0x80, 0x70, "psam",
                                    data=InitSamForPurchaseBody,
                                    response=InitSamForPurchaseResponse, doc="P1 01 P2 00")
CREDIT_SAM_FOR_PURCHASE = CommandSpec("CREDIT SAM FOR PURCHASE", 0x80, 0x72, "psam",
                                      data=MacOnlyBody, doc="bad MAC2 → 63CF")

COMMANDS: tuple[CommandSpec, ...] = (
    SELECT, READ_BINARY, READ_RECORD, UPDATE_BINARY, UPDATE_RECORD, VERIFY, CHANGE_PIN,
    PIN_UNBLOCK_RELOAD, GET_CHALLENGE, INTERNAL_AUTHENTICATE, EXTERNAL_AUTHENTICATE, GET_RESPONSE,
    APPLICATION_BLOCK, CARD_BLOCK, INITIALIZE_ENVIRONMENT, DELIVERY_SESSION_KEY, CIPHER_DATA,
    CREATE_KEY, INIT_SAM_FOR_PURCHASE, CREDIT_SAM_FOR_PURCHASE,
)
# Sharing a (CLA, INS) with a command above, so not in the dispatch table.
ALIASES: tuple[CommandSpec, ...] = (PSAM_EXTERNAL_AUTHENTICATE, CHANGE_KEY)

# P2 of READ/UPDATE RECORD: (SFI << 3) | mode
REC_FIRST_ID = 0b000
REC_LAST_ID = 0b001
REC_NEXT_ID = 0b010
REC_PREV_ID = 0b011
REC_NUMBER = 0b100
REC_FROM_P1 = 0b101
REC_TO_P1 = 0b110

SELECT_BY_FID = 0x00
SELECT_EF = 0x02
SELECT_BY_NAME = 0x04
SELECT_NO_FCI = 0x0C

CIPHER_ENC = 0x00
CIPHER_ENC_MORE = 0x02
CIPHER_MAC = 0x05
CIPHER_MAC_FIRST = 0x07
CIPHER_MAC_NEXT = 0x03
CIPHER_MAC_LAST = 0x01


def record_p2(sfi: int, mode: int) -> int:
    if not 0 <= sfi <= 30 or not 0 <= mode <= 7:
        raise ValueError("SFI 0..30, mode 0..7")
    return (sfi << 3) | mode


def select_aid(aid: bytes, fci: bool = True) -> CommandApdu:
    return SELECT.build(SELECT_BY_NAME, 0x00 if fci else SELECT_NO_FCI, aid,
                        le=256 if fci else None)


def select_fid(fid: int, p1: int = SELECT_EF) -> CommandApdu:
    """SELECT by file identifier with P2 00, as readers send it (``00 A4 02 00 02 EF 05``)."""
    return SELECT.build(p1, 0x00, fid.to_bytes(2, "big"))


def read_record(p1: int, sfi: int, mode: int, le: int) -> CommandApdu:
    return READ_RECORD.build(p1, record_p2(sfi, mode), le=le)


def get_challenge(n: int = 8) -> CommandApdu:
    return GET_CHALLENGE.build(le=n)


def verify(pin_bcd: bytes) -> CommandApdu:
    """VERIFY with a PIN (BCD); :func:`verify_query` asks the state without one."""
    if not pin_bcd:
        raise ValueError("VERIFY needs a PIN; use verify_query() for the no-data query")
    return VERIFY.build(0, 0, pin_bcd)


def verify_query() -> CommandApdu:
    """``00 20 00 00``: 9000 when verified, else 63Cx (no try spent)."""
    return VERIFY.build(0, 0)


def change_pin(old_bcd: bytes, new_bcd: bytes) -> CommandApdu:
    return CHANGE_PIN.build(0x01, 0x00, old_bcd + b"\xff" + new_bcd)


def internal_authenticate(session_input: bytes, plain: bytes) -> CommandApdu:
    """``00 88 00 00 10 <input> <plain> 00``: case 4, Le 00 (card-spec §3.1)."""
    return INTERNAL_AUTHENTICATE.build(0, 0, {"first": session_input, "second": plain,
                                              "key_version": None}, le=256)


def external_authenticate(key_id: int, auth: bytes, plain: bytes) -> CommandApdu:
    return EXTERNAL_AUTHENTICATE.build(0, key_id, {"first": auth, "second": plain,
                                                   "key_version": None})


def get_response(le: int) -> CommandApdu:
    return GET_RESPONSE.build(le=le)
