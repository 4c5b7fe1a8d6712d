"""The ISO 7816-4 machinery every emulated card shares: APDU decoding, dispatch by the command
table of :mod:`apdu_specs.apdu`, Le handling, ``61xx``/``6Cxx`` and GET RESPONSE — in one place.

Handlers have the shape ``(apdu) -> bytes`` (the response data) and raise
:class:`~apdu_specs.status.StatusWordError` to end with a status word. Anything else a handler
raises is a bug in the emulator: it is logged and answered ``6F00``; the card never crashes.

Two response modes:

* direct (T=1 style): response data comes back with the command, as vpcd presents it;
* T=0 style: a command that carried data (case 4) answers ``61xx`` and the data waits for
  GET RESPONSE, as a T=0 card would. vpcd passes APDUs unchanged, so this mode is how a
  reader's ``61xx`` handling gets exercised.
"""

from __future__ import annotations

import enum
import logging
import os
from collections.abc import Callable

from apdu_specs import status
from apdu_specs.apdu import COMMANDS, GET_RESPONSE, ApduFormatError, CommandApdu, CommandSpec
from apdu_specs.status import SW, StatusWordError

log = logging.getLogger(__name__)

Handler = Callable[[CommandApdu], bytes]


class LePolicy(enum.Enum):
    EXACT = "exact"  # Le must equal the response length (READ RECORD): else 6Cxx
    UP_TO = "up-to"  # Le absent or 00: everything; otherwise must match (else 6Cxx)
    HANDLER = "handler"  # the handler sizes the answer itself (READ BINARY, GET CHALLENGE)


class ResponseMode(enum.Enum):
    DIRECT = "direct"
    T0 = "t0"


def _sw(sw: int) -> bytes:
    return sw.to_bytes(2, "big")


class Cos:
    """Base of the emulated card and the emulated PSAM (vsmartcard's five-method contract)."""

    def __init__(self, mode: ResponseMode = ResponseMode.DIRECT):
        self.mode = mode
        self._pending = b""
        self._handlers: dict[tuple[int, int], tuple[Handler, LePolicy, CommandSpec]] = {}
        self.powered = True
        self.trace: Callable[[bytes, bytes], None] | None = None
        self.challenge: bytes | None = None

    # -- registration ------------------------------------------------------------------------

    def register(self, spec: CommandSpec, handler: Handler,
                 le: LePolicy = LePolicy.UP_TO, cla: int | None = None) -> None:
        """Route ``spec`` (matched on CLA without the SM bit, and INS) to ``handler``."""
        base = spec.cla if cla is None else cla
        self._handlers[(base & ~0x04, spec.ins)] = (handler, le, spec)

    def supported(self) -> list[CommandSpec]:
        return [spec for _, _, spec in self._handlers.values()]

    # -- power ----------------------------------------------------------------------------------

    @property
    def atr(self) -> bytes:
        raise NotImplementedError

    def power_on(self) -> None:
        self.powered = True
        self._reset_volatile()

    def power_off(self) -> None:
        self.powered = False
        self._reset_volatile()

    def reset(self) -> None:
        self.powered = True
        self._reset_volatile()

    def _reset_volatile(self) -> None:
        self._pending = b""
        self.challenge = None

    def _get_challenge(self, apdu: CommandApdu) -> bytes:
        """GET CHALLENGE: 4, 8 or 16 random bytes, remembered for one use."""
        check_p1p2(apdu, 0, 0)
        if apdu.data or apdu.le not in (4, 8, 16):
            raise StatusWordError(SW.WRONG_LENGTH)
        self.challenge = os.urandom(apdu.le)
        return self.challenge

    # -- execution ------------------------------------------------------------------------------

    def execute(self, raw: bytes) -> bytes:
        """One C-APDU in, one R-APDU out. Never raises."""
        try:
            out = self._execute(raw)
        except Exception:  # a bug in a handler must not take the card down
            log.exception("emulator fault while executing INS %s", raw[1:2].hex() or "?")
            self._pending = b""
            out = _sw(SW.NO_PRECISE_DIAGNOSIS)
        if self.trace is not None:
            self.trace(raw, out)
        return out

    def _execute(self, raw: bytes) -> bytes:
        try:
            apdu = CommandApdu.parse(raw)
        except ApduFormatError as exc:
            self._pending = b""
            return _sw(exc.sw)
        if apdu.cla == 0xFF:
            return _sw(SW.CLA_NOT_SUPPORTED)
        if apdu.ins == GET_RESPONSE.ins and apdu.cla == GET_RESPONSE.cla:
            return self._get_response(apdu)
        self._pending = b""
        entry = self._handlers.get((apdu.cla & ~0x04, apdu.ins))
        if entry is None:
            if any(ins == apdu.ins for _, ins in self._handlers):
                return _sw(SW.CLA_NOT_SUPPORTED)
            return _sw(SW.INS_NOT_SUPPORTED)
        handler, policy, _spec = entry
        try:
            self.precheck(apdu)
            data = handler(apdu)
        except StatusWordError as exc:
            return _sw(exc.sw)
        return self._respond(apdu, data, policy)

    def precheck(self, apdu: CommandApdu) -> None:
        """Hook for card-wide refusals (a blocked card answers 6A81 to everything)."""

    def _respond(self, apdu: CommandApdu, data: bytes, policy: LePolicy) -> bytes:
        if not data:
            return _sw(SW.OK)
        n = len(data)
        if n > 256:
            log.error("response of %d bytes does not fit a short APDU", n)
            return _sw(SW.NO_PRECISE_DIAGNOSIS)
        if policy is LePolicy.HANDLER:
            return data + _sw(SW.OK)
        case4 = bool(apdu.data) or apdu.le is None
        if self.mode is ResponseMode.T0 and case4:
            # T=0 carries no Le in a case-4 command: the card says how much waits.
            self._pending = data
            return _sw(status.more_data(n))
        if policy is LePolicy.EXACT:
            if apdu.le != n:
                return _sw(status.wrong_le(n))
        elif (apdu.le is not None and apdu.le not in (256, n)) or (
            apdu.le == 256 and self.mode is ResponseMode.T0 and n != 256
        ):
            return _sw(status.wrong_le(n))
        return data + _sw(SW.OK)

    def _get_response(self, apdu: CommandApdu) -> bytes:
        if apdu.p1 or apdu.p2:
            self._pending = b""
            return _sw(SW.WRONG_P1P2)
        pending = self._pending
        if not pending:
            return _sw(SW.CONDITIONS_NOT_SATISFIED)
        if apdu.data or apdu.le is None:
            self._pending = b""
            return _sw(SW.WRONG_LENGTH)
        le = apdu.le
        if le > len(pending):
            return _sw(status.wrong_le(len(pending)))
        chunk, rest = pending[:le], pending[le:]
        self._pending = rest
        return chunk + _sw(status.more_data(len(rest)) if rest else SW.OK)


def check_p1p2(apdu: CommandApdu, p1: int | None = 0, p2: int | None = 0) -> None:
    if (p1 is not None and apdu.p1 != p1) or (p2 is not None and apdu.p2 != p2):
        raise StatusWordError(SW.WRONG_P1P2)


def check_lc(apdu: CommandApdu, *allowed: int) -> None:
    if len(apdu.data) not in allowed:
        raise StatusWordError(SW.WRONG_LENGTH)


def read_slice(data: bytes, offset: int, le: int | None) -> bytes:
    """READ BINARY: up to Le bytes from ``offset``; absent/00 Le reads what is there."""
    if offset >= len(data):
        raise StatusWordError(SW.OFFSET_BEYOND_EF)
    avail = len(data) - offset
    if le not in (None, 256) and le is not None and le > avail:
        raise StatusWordError(status.wrong_le(avail))
    return data[offset : offset + min(le or 256, avail)]


def known_commands() -> tuple[CommandSpec, ...]:
    return COMMANDS
