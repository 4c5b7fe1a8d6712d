"""The serial keypad reader's frame protocol (a project definition; see README "Serial reader").

A reader with its own PIN keypad on a serial line (115200 8N1, raw: no echo, no XON/XOFF — frames
carry 0x03, 0x11 and 0x13 as ordinary bytes). The host sends requests, the reader answers each one;
the reader also sends unsolicited card events.

Frame::

    STX 0x02 | LEN uint16 BE | SEQ uint8 | CMD uint8 | DATA | CRC uint16 BE | ETX 0x03

* ``LEN`` counts SEQ, CMD and DATA (2 … 263): DATA is at most :data:`MAX_DATA` = 261 bytes, a
  short C-APDU (4 + 1 + 255 + 1) or a result byte and a short R-APDU (1 + 256 + 2). Extended APDUs
  are not carried.
* ``CRC`` is CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF, no reflection, no final XOR; check
  value 0x29B1 for ``"123456789"``) over LEN, SEQ, CMD and DATA.
* ``SEQ`` 1 … 255 is chosen by the host per request (incremented, wrapping 255 → 1, starting at a
  random value); a reply carries its request's SEQ. SEQ 0 is reserved for the reader's unsolicited
  frames; a request with SEQ 0 is answered BAD_PARAMETER.
* A reply has CMD = request CMD | 0x80 and DATA = a :class:`Result` byte, then the payload.

Commands (host → reader; payloads of OK replies):

=====  ==============  ===============================  ========================================
CMD    name            request DATA                     OK reply payload
=====  ==============  ===============================  ========================================
0x10   POWER_ON        —                                ATR (powers the card only if unpowered)
0x11   POWER_OFF       —                                — (OK also without a card)
0x12   STATUS          —                                1 byte :class:`SlotStatus`
0x20   APDU            C-APDU (4 … 261 bytes)           R-APDU (data ‖ SW1 SW2)
0x30   KEYPAD_VERIFY   timeout in seconds (1 … 255)     :class:`KeypadStatus` byte ‖ SW (2 bytes)
0x31   KEYPAD_CHANGE   timeout in seconds (1 … 255)     :class:`KeypadStatus` byte ‖ SW (2 bytes)
0x40   INFO            —                                reader name and version, ASCII
0xE0   CARD_EVENT      (reader → host, SEQ 0, no reply) 0x00 removed | 0x01 inserted ‖ ATR
=====  ==============  ===============================  ========================================

Results: 0x00 OK · 0x01 NO_CARD · 0x02 CARD_MUTE (card removed or re-inserted since POWER_ON, not
powered, or not answering) · 0x03 BAD_FRAME (the request's checksum failed: it was not executed) ·
0x04 UNKNOWN_CMD · 0x05 BAD_PARAMETER. The keypad SW is 0000 when the card was not asked (cancel,
timeout, bad length, mismatch, change to an initial PIN).

Rules beyond the proposal this module started from, and why:

* **Resynchronisation.** A receiver scans for STX and rejects a LEN outside 2 … 263 at once. A
  candidate that fails (bad LEN, bad CRC, no ETX) costs only its STX byte: scanning resumes at the
  next byte, so a real frame that followed a stray STX is still found. A frame is sent in one
  burst; when the line stays idle for :data:`INTER_BYTE_TIMEOUT` with part of a frame buffered,
  the receiver abandons it (:meth:`FrameDecoder.flush`). Without that rule, line noise such as
  ``02 01 00`` would make the receiver wait for 256 bytes and swallow the next real frame.
* **BAD_FRAME only for a well-framed candidate.** The reader answers BAD_FRAME (with the
  unverified SEQ and CMD | 0x80) only to a complete candidate whose ETX is in place and whose
  CRC fails — a request the line garbled. A stray STX in noise is skipped silently; answering it
  would flood the host with refusals carrying random SEQs.
* **At most once.** The host retransmits a request that drew BAD_FRAME once, with the same SEQ.
  Noise can also draw a BAD_FRAME whose random SEQ happens to match the request in flight while
  the real request is executed too; so the reader keeps its last request and reply, and answers a
  byte-identical request with the same SEQ within :data:`DUPLICATE_WINDOW` seconds from that
  cache instead of executing it again (a VERIFY twice would cost a PIN try). The host starts at a
  random SEQ so a restarted host does not hit that cache by accident.
* **A garbled reply is not retried.** If the reader's answer arrives with a bad CRC, the command
  may have run; the host reports a checksum error (−15) rather than sending it again.
* **Frames with the reply bit from the host are ignored**: on a pty left in echo mode the reader
  would otherwise read its own replies back as requests.

Logging: frames are described by :func:`describe` (command, SEQ, result, lengths) — never logged
as hex, since an APDU frame may carry a VERIFY body.
"""

from __future__ import annotations

import binascii
import enum
from dataclasses import dataclass
from typing import Any

import construct as cs

STX = 0x02
ETX = 0x03
MAX_DATA = 261
MIN_LEN = 2  # SEQ + CMD
MAX_LEN = MAX_DATA + 2
OVERHEAD = 8  # STX, LEN(2), SEQ, CMD, CRC(2), ETX
EVENT_SEQ = 0
REPLY_BIT = 0x80
INTER_BYTE_TIMEOUT = 0.1  # seconds of silence that abandon a partial frame
DUPLICATE_WINDOW = 2.0  # seconds during which the reader answers a repeated request from its cache
MAX_KEYPAD_TIMEOUT = 255


class Command(enum.IntEnum):
    """Frame commands (a reply has the command | :data:`REPLY_BIT`)."""

    POWER_ON = 0x10
    POWER_OFF = 0x11
    STATUS = 0x12
    APDU = 0x20
    KEYPAD_VERIFY = 0x30
    KEYPAD_CHANGE = 0x31
    INFO = 0x40
    CARD_EVENT = 0xE0


class Result(enum.IntEnum):
    """First DATA byte of every reply."""

    OK = 0x00
    NO_CARD = 0x01
    CARD_MUTE = 0x02  # removed or re-inserted since POWER_ON, unpowered, or not answering
    BAD_FRAME = 0x03  # the request's checksum failed; it was not executed
    UNKNOWN_CMD = 0x04
    BAD_PARAMETER = 0x05


class SlotStatus(enum.IntEnum):
    """Payload of a STATUS reply."""

    NO_CARD = 0x00
    PRESENT = 0x01  # inserted, not powered
    POWERED = 0x02


class CardEvent(enum.IntEnum):
    """First DATA byte of a CARD_EVENT frame."""

    REMOVED = 0x00
    INSERTED = 0x01


class KeypadStatus(enum.IntEnum):
    """Outcome of a keypad PIN operation. Values ≥ 0x31 are the reader-interface codes' digits
    (−31 cancelled … −36 cannot change to an initial PIN)."""

    OK = 0x00
    CARD_STATUS = 0x01  # the card answered a status word other than 9000 (63Cx, 6983, ...)
    CANCELLED = 0x31
    TIMEOUT = 0x32
    BAD_LENGTH = 0x33
    MISMATCH = 0x34
    INITIAL_PIN = 0x35
    TO_INITIAL = 0x36


def crc16(data: bytes) -> int:
    """CRC-16/CCITT-FALSE (``binascii.crc_hqx`` is this polynomial, unreflected; init 0xFFFF)."""
    return binascii.crc_hqx(data, 0xFFFF)


# -- layouts ----------------------------------------------------------------------------------

FrameBody = cs.Struct(
    "len" / cs.Rebuild(cs.Int16ub, lambda this: len(this.data) + 2),
    "seq" / cs.Int8ub,
    "cmd" / cs.Int8ub,
    "data" / cs.Bytes(cs.this.len - 2),
)
FrameLayout = cs.Struct(
    "stx" / cs.Const(bytes((STX,))),
    "body" / cs.RawCopy(FrameBody),
    "crc" / cs.Checksum(cs.Int16ub, crc16, cs.this.body.data),
    "etx" / cs.Const(bytes((ETX,))),
)
ReplyData = cs.Struct("result" / cs.Int8ub, "payload" / cs.GreedyBytes)
KeypadRequest = cs.Struct("timeout" / cs.Int8ub)
KeypadReply = cs.Struct("status" / cs.Int8ub, "sw" / cs.Int16ub)
StatusReply = cs.Struct("slot" / cs.Int8ub)
CardEventData = cs.Struct("event" / cs.Int8ub, "atr" / cs.GreedyBytes)


class FrameError(ValueError):
    """A frame or payload that does not follow this protocol."""


@dataclass(frozen=True)
class Frame:
    """One decoded frame."""

    seq: int
    cmd: int
    data: bytes = b""

    @property
    def is_reply(self) -> bool:
        return self.cmd & REPLY_BIT != 0 and self.cmd != Command.CARD_EVENT

    @property
    def is_event(self) -> bool:
        return self.cmd == Command.CARD_EVENT

    def encode(self) -> bytes:
        return encode_frame(self.seq, self.cmd, self.data)


@dataclass(frozen=True)
class BadFrame:
    """A rejected candidate, as :class:`FrameDecoder` reports it.

    ``reason``: ``"length"`` (LEN outside 2 … 263), ``"checksum"`` (complete, CRC wrong) or
    ``"terminator"`` (complete, no ETX). ``seq``/``cmd`` are the unverified header bytes, when
    they arrived. It carries no frame bytes: a garbled APDU frame may hold a PIN.
    """

    reason: str
    length: int
    seq: int | None = None
    cmd: int | None = None

    @property
    def well_framed(self) -> bool:
        """A complete candidate with its ETX in place whose CRC failed: a garbled frame."""
        return self.reason == "checksum"


def encode_frame(seq: int, cmd: int, data: bytes = b"") -> bytes:
    """The bytes of one frame; ``FrameError`` for a SEQ/CMD outside a byte or oversize DATA."""
    if not (0 <= seq <= 0xFF and 0 <= cmd <= 0xFF):
        raise FrameError("SEQ and CMD are single bytes")
    if len(data) > MAX_DATA:
        raise FrameError(f"frame data of {len(data)} bytes exceeds {MAX_DATA}")
    out: bytes = FrameLayout.build({"body": {"value": {"seq": seq, "cmd": cmd, "data": bytes(data)}}})
    return out


def decode_frame(raw: bytes) -> Frame:
    """Exactly one frame; ``FrameError`` on anything else (length, CRC, STX/ETX)."""
    if not OVERHEAD <= len(raw) <= OVERHEAD + MAX_DATA:
        raise FrameError(f"a frame is {OVERHEAD} … {OVERHEAD + MAX_DATA} bytes, not {len(raw)}")
    try:
        parsed = FrameLayout.parse(raw)
    except cs.ChecksumError:
        raise FrameError("frame checksum mismatch") from None
    except cs.ConstructError:
        raise FrameError("malformed frame") from None
    body = parsed.body.value
    if len(raw) != OVERHEAD + len(body.data):
        raise FrameError("frame length does not match LEN")
    return Frame(body.seq, body.cmd, bytes(body.data))


# -- payload helpers --------------------------------------------------------------------------

def reply_frame(seq: int, cmd: int, result: Result, payload: bytes = b"") -> bytes:
    """The reply to request ``(seq, cmd)``."""
    return encode_frame(seq, (cmd | REPLY_BIT) & 0xFF,
                        ReplyData.build({"result": int(result), "payload": payload}))


def parse_reply(frame: Frame) -> tuple[Result, bytes]:
    """A reply's result and payload; ``FrameError`` if DATA is empty or the result unknown."""
    if not frame.data:
        raise FrameError("reply without a result byte")
    parsed = ReplyData.parse(frame.data)
    try:
        return Result(parsed.result), bytes(parsed.payload)
    except ValueError:
        raise FrameError(f"unknown result 0x{parsed.result:02X}") from None


def keypad_request(timeout: float) -> bytes:
    """DATA of KEYPAD_VERIFY/KEYPAD_CHANGE: the timeout rounded up to whole seconds, 1 … 255."""
    secs = min(max(int(-(-timeout // 1)), 1), MAX_KEYPAD_TIMEOUT)
    out: bytes = KeypadRequest.build({"timeout": secs})
    return out


def parse_keypad_request(data: bytes) -> int:
    """The timeout in seconds; ``FrameError`` unless DATA is one byte 1 … 255."""
    if len(data) != KeypadRequest.sizeof() or data[0] == 0:
        raise FrameError("keypad timeout must be one byte, 1 … 255 seconds")
    value: int = KeypadRequest.parse(data).timeout
    return value


def keypad_reply(status: KeypadStatus, sw: int) -> bytes:
    """OK-reply payload of a keypad command."""
    out: bytes = KeypadReply.build({"status": int(status), "sw": sw & 0xFFFF})
    return out


def parse_keypad_reply(payload: bytes) -> tuple[KeypadStatus, int]:
    if len(payload) != KeypadReply.sizeof():
        raise FrameError(f"keypad reply of {len(payload)} bytes, expected 3")
    parsed = KeypadReply.parse(payload)
    try:
        return KeypadStatus(parsed.status), int(parsed.sw)
    except ValueError:
        raise FrameError(f"unknown keypad status 0x{parsed.status:02X}") from None


def parse_status_reply(payload: bytes) -> SlotStatus:
    if len(payload) != StatusReply.sizeof():
        raise FrameError("STATUS reply must be one byte")
    try:
        return SlotStatus(StatusReply.parse(payload).slot)
    except ValueError:
        raise FrameError(f"unknown slot status 0x{payload[0]:02X}") from None


def event_frame(event: CardEvent, atr: bytes = b"") -> bytes:
    """An unsolicited CARD_EVENT frame (SEQ 0)."""
    return encode_frame(EVENT_SEQ, Command.CARD_EVENT, CardEventData.build({"event": int(event), "atr": atr}))


def parse_event(frame: Frame) -> tuple[CardEvent, bytes]:
    """A CARD_EVENT frame's event and ATR (empty for a removal)."""
    if not frame.is_event or not frame.data:
        raise FrameError("not a card event")
    parsed = CardEventData.parse(frame.data)
    try:
        return CardEvent(parsed.event), bytes(parsed.atr)
    except ValueError:
        raise FrameError(f"unknown card event 0x{parsed.event:02X}") from None


def _name(enum_type: type[enum.IntEnum], value: int) -> str:
    try:
        return enum_type(value).name
    except ValueError:
        return f"0x{value:02X}"


def describe(frame: Frame) -> dict[str, Any]:
    """A log-safe summary: names, SEQ, result, keypad outcome, lengths — no APDU bytes."""
    out: dict[str, Any] = {"seq": frame.seq}
    if frame.is_event:
        out["cmd"] = "CARD_EVENT"
        if frame.data:
            out["event"] = _name(CardEvent, frame.data[0])
            out["atr_len"] = len(frame.data) - 1
        return out
    base = frame.cmd & ~REPLY_BIT
    out["cmd"] = _name(Command, base)
    out["reply"] = frame.is_reply
    if not frame.is_reply:
        if base in (Command.KEYPAD_VERIFY, Command.KEYPAD_CHANGE) and len(frame.data) == 1:
            out["timeout"] = frame.data[0]
        else:
            out["data_len"] = len(frame.data)
        return out
    if not frame.data:
        return out
    out["result"] = _name(Result, frame.data[0])
    payload = frame.data[1:]
    if frame.data[0] == Result.OK and base in (Command.KEYPAD_VERIFY, Command.KEYPAD_CHANGE) \
            and len(payload) == 3:
        out["status"] = _name(KeypadStatus, payload[0])
        out["sw"] = int.from_bytes(payload[1:], "big")
    elif frame.data[0] == Result.OK and base == Command.STATUS and len(payload) == 1:
        out["slot"] = _name(SlotStatus, payload[0])
    elif frame.data[0] == Result.OK and base == Command.APDU and len(payload) >= 2:
        out["sw"] = int.from_bytes(payload[-2:], "big")
        out["data_len"] = len(payload) - 2
    else:
        out["payload_len"] = len(payload)
    return out


# -- streaming decoder ------------------------------------------------------------------------

class FrameDecoder:
    """Feed bytes as they arrive; get whole frames, and :class:`BadFrame` reports for rejects.

    Never raises on input: garbage is skipped (counted in :attr:`discarded`), rejected candidates
    are reported in line with the frames. See the module docstring for the resynchronisation
    rules; call :meth:`flush` when the line has been idle for :data:`INTER_BYTE_TIMEOUT`.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self.discarded = 0  # bytes skipped outside any frame

    @property
    def pending(self) -> int:
        """Bytes held back waiting for the rest of a frame."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Frame | BadFrame]:
        self._buf += data
        return self._scan(final=False)

    def flush(self) -> list[Frame | BadFrame]:
        """The line went idle: decode what is complete, abandon any partial frame."""
        out = self._scan(final=True)
        self.discarded += len(self._buf)
        self._buf.clear()
        return out

    def _skip_stx(self) -> None:
        # Drop only the STX of a failed candidate: a real frame may start inside it.
        del self._buf[:1]
        self.discarded += 1

    def _scan(self, final: bool) -> list[Frame | BadFrame]:
        out: list[Frame | BadFrame] = []
        buf = self._buf
        while buf:
            start = buf.find(STX)
            if start < 0:
                self.discarded += len(buf)
                buf.clear()
                break
            if start:
                self.discarded += start
                del buf[:start]
            if len(buf) < 3:
                if not final:
                    break
                self._skip_stx()
                continue
            length = int.from_bytes(buf[1:3], "big")
            seq = buf[3] if len(buf) > 3 else None
            cmd = buf[4] if len(buf) > 4 else None
            if not MIN_LEN <= length <= MAX_LEN:
                out.append(BadFrame("length", length, seq, cmd))
                self._skip_stx()
                continue
            total = length + OVERHEAD - 2
            if len(buf) < total:
                if not final:
                    break
                self._skip_stx()
                continue
            try:
                parsed = FrameLayout.parse(bytes(buf[:total]))
            except cs.ChecksumError:
                out.append(BadFrame("checksum" if buf[total - 1] == ETX else "terminator", length, seq, cmd))
                self._skip_stx()
                continue
            except cs.ConstructError:
                out.append(BadFrame("terminator", length, seq, cmd))
                self._skip_stx()
                continue
            body = parsed.body.value
            out.append(Frame(body.seq, body.cmd, bytes(body.data)))
            del buf[:total]
        return out


# -- test vectors: (frame hex, frame, meaning as :func:`describe` gives it) ---------------------
# ATRs are shortened to 4 bytes; the APDU is SELECT SSSE. ``tests/test_serial_frame.py`` walks them.

_R = REPLY_BIT
VECTORS: tuple[tuple[str, Frame, dict[str, Any]], ...] = (
    ("0200020110CBA003", Frame(1, Command.POWER_ON),
     {"seq": 1, "cmd": "POWER_ON", "reply": False, "data_len": 0}),
    ("0200070190003B6C0000755303", Frame(1, Command.POWER_ON | _R, bytes.fromhex("003B6C0000")),
     {"seq": 1, "cmd": "POWER_ON", "reply": True, "result": "OK", "payload_len": 4}),
    ("020003029001EC7A03", Frame(2, Command.POWER_ON | _R, b"\x01"),
     {"seq": 2, "cmd": "POWER_ON", "reply": True, "result": "NO_CARD", "payload_len": 0}),
    ("02000203128D8003", Frame(3, Command.STATUS),
     {"seq": 3, "cmd": "STATUS", "reply": False, "data_len": 0}),
    ("020004039200022AD103", Frame(3, Command.STATUS | _R, b"\x00\x02"),
     {"seq": 3, "cmd": "STATUS", "reply": True, "result": "OK", "slot": "POWERED"}),
    ("020016042000A404000F7378312E73682EC9E7BBE1B1A3D5CFC4D003",
     Frame(4, Command.APDU, bytes.fromhex("00A404000F7378312E73682EC9E7BBE1B1A3D5CF")),
     {"seq": 4, "cmd": "APDU", "reply": False, "data_len": 20}),
    # R-APDU 0203 9100 9000: data bytes 02 and 03 travel unescaped (LEN frames them).
    ("02000904A000020391009000265503", Frame(4, Command.APDU | _R, bytes.fromhex("00020391009000")),
     {"seq": 4, "cmd": "APDU", "reply": True, "result": "OK", "sw": 0x9000, "data_len": 4}),
    ("02000305A0025C1C03", Frame(5, Command.APDU | _R, b"\x02"),
     {"seq": 5, "cmd": "APDU", "reply": True, "result": "CARD_MUTE", "payload_len": 0}),
    ("02000306301ECE1A03", Frame(6, Command.KEYPAD_VERIFY, bytes((30,))),
     {"seq": 6, "cmd": "KEYPAD_VERIFY", "reply": False, "timeout": 30}),
    ("02000606B000359000057A03", Frame(6, Command.KEYPAD_VERIFY | _R, bytes.fromhex("00359000")),
     {"seq": 6, "cmd": "KEYPAD_VERIFY", "reply": True, "result": "OK", "status": "INITIAL_PIN",
      "sw": 0x9000}),
    ("02000607B0000163C2E62303", Frame(7, Command.KEYPAD_VERIFY | _R, bytes.fromhex("000163C2")),
     {"seq": 7, "cmd": "KEYPAD_VERIFY", "reply": True, "result": "OK", "status": "CARD_STATUS",
      "sw": 0x63C2}),
    ("02000308313CE20A03", Frame(8, Command.KEYPAD_CHANGE, bytes((60,))),
     {"seq": 8, "cmd": "KEYPAD_CHANGE", "reply": False, "timeout": 60}),
    ("02000608B100340000005303", Frame(8, Command.KEYPAD_CHANGE | _R, bytes.fromhex("00340000")),
     {"seq": 8, "cmd": "KEYPAD_CHANGE", "reply": True, "result": "OK", "status": "MISMATCH", "sw": 0}),
    ("0200030991030FF803", Frame(9, Command.POWER_OFF | _R, b"\x03"),
     {"seq": 9, "cmd": "POWER_OFF", "reply": True, "result": "BAD_FRAME", "payload_len": 0}),
    ("0200030AFF040E6A03", Frame(10, 0x7F | _R, b"\x04"),
     {"seq": 10, "cmd": "0x7F", "reply": True, "result": "UNKNOWN_CMD", "payload_len": 0}),
    ("0200110BC0007373636172642D656D7520302E310C5E03", Frame(11, Command.INFO | _R, b"\x00sscard-emu 0.1"),
     {"seq": 11, "cmd": "INFO", "reply": True, "result": "OK", "payload_len": 14}),
    ("02000300E0009A6203", Frame(0, Command.CARD_EVENT, b"\x00"),
     {"seq": 0, "cmd": "CARD_EVENT", "event": "REMOVED", "atr_len": 0}),
    ("02000700E0013B6C000022FF03", Frame(0, Command.CARD_EVENT, bytes.fromhex("013B6C0000")),
     {"seq": 0, "cmd": "CARD_EVENT", "event": "INSERTED", "atr_len": 4}),
)
