"""The serial keypad reader: a reader with its own PIN keypad on a serial line, so the PIN never
reaches the host. Protocol: :mod:`apdu_specs.serial_frame`.

Reader name ``serial:/dev/ttyUSB0`` (any tty path; the emulator prints a pty's). The port is
opened lazily, exclusively, in the reader's worker thread, and all I/O stays in that thread; after
the line fails it is reopened on the next operation, so an unplugged and replugged reader comes
back without a restart.

* An operation powers the card (POWER_ON is idempotent: a powered card keeps its state); closing
  the link with ``reset`` powers it off, so the next operation starts from a cold reset.
* Failures: no card at the start → NO_CARD; the card removed or re-inserted during the operation
  → CARD_REMOVED; the line closed or failing → READER_GONE; no reply in time → CARD_NO_ANSWER;
  a garbled reply, or a request the reader refuses as garbled twice → READER_CHECKSUM (−15).
* Card events the reader announces arrive whenever the host reads; they are kept in a queue
  (:meth:`SerialReader.pending_events`, or :meth:`SerialReader.poll_events` to read the line
  first) and passed to ``on_event`` if given (called in the worker thread).

Nothing here logs a frame's bytes: an APDU frame can carry a VERIFY body.
"""

from __future__ import annotations

import contextlib
import queue
import secrets
import time

import serial
import structlog

from apdu_specs.serial_frame import (
    INTER_BYTE_TIMEOUT,
    MAX_DATA,
    REPLY_BIT,
    BadFrame,
    CardEvent,
    Command,
    Frame,
    FrameDecoder,
    FrameError,
    Result,
    SlotStatus,
    describe,
    encode_frame,
    keypad_request,
    parse_event,
    parse_keypad_reply,
    parse_reply,
    parse_status_reply,
)
from sscardd.readers.base import (
    CardLink,
    CardRemovedError,
    EventCallback,
    KeypadResult,
    KeypadUnsupported,
    LinkError,
    NoCardError,
    Reader,
    ReaderChecksumError,
    ReaderEvent,
    ReaderEventKind,
    ReaderGoneError,
    map_link_error,
)

log = structlog.get_logger(__name__)

DEFAULT_BAUDRATE = 115200
DEFAULT_REPLY_TIMEOUT = 2.0  # an APDU's round trip; keypad commands add their own timeout


class _SerialLink:
    """The powered card during one operation (worker thread only)."""

    def __init__(self, reader: SerialReader, atr: bytes):
        self._reader = reader
        self._atr = atr

    @property
    def atr(self) -> bytes:
        return self._atr

    def transmit(self, apdu: bytes) -> bytes:
        if len(apdu) > MAX_DATA:
            raise LinkError(f"a {len(apdu)}-byte C-APDU is too long for the serial reader (short APDUs only)")
        result, payload = self._reader._exchange(Command.APDU, apdu)
        self._reader._check(Command.APDU, result)
        if len(payload) < 2:
            raise LinkError("the reader returned an R-APDU without a status word")
        return payload

    def reset(self) -> bytes:
        r = self._reader
        r._check(Command.POWER_OFF, r._exchange(Command.POWER_OFF)[0])
        result, atr = r._exchange(Command.POWER_ON)
        r._check(Command.POWER_ON, result)
        self._atr = atr
        return atr

    def keypad_verify(self, timeout: float) -> KeypadResult:
        return self._reader._keypad(Command.KEYPAD_VERIFY, timeout)

    def keypad_change(self, timeout: float) -> KeypadResult:
        return self._reader._keypad(Command.KEYPAD_CHANGE, timeout)


class SerialReader(Reader):
    """A serial keypad reader at ``port`` (a tty path; a ``serial:`` prefix is accepted)."""

    kind = "serial"
    has_keypad = True

    def __init__(self, port: str, name: str | None = None, *, baudrate: int = DEFAULT_BAUDRATE,
                 reply_timeout: float = DEFAULT_REPLY_TIMEOUT, on_event: EventCallback | None = None):
        port = port.removeprefix("serial:")
        super().__init__(name or f"serial:{port}")
        self.port = port
        self.baudrate = baudrate
        self.reply_timeout = reply_timeout
        self._on_event = on_event
        self._events: queue.SimpleQueue[ReaderEvent] = queue.SimpleQueue()
        self._ser: serial.Serial | None = None
        self._decoder = FrameDecoder()
        # A random first SEQ: a restarted host must not look like a retransmission to the
        # reader's duplicate cache (see apdu_specs.serial_frame).
        self._seq = secrets.randbelow(255) + 1
        self._unanswered = False  # the last request went unanswered: do not wait again to close
        self._must_power_cycle = False  # a reset is owed to the card (see _close_link)

    # -- events (any thread) --------------------------------------------------------------------

    def pending_events(self) -> list[ReaderEvent]:
        """Card events received so far and not yet taken."""
        out: list[ReaderEvent] = []
        with contextlib.suppress(queue.Empty):
            while True:
                out.append(self._events.get_nowait())
        return out

    async def poll_events(self) -> list[ReaderEvent]:
        """Read what the reader sent while idle, then return the pending events."""
        await self.in_thread(self._poll_sync)
        return self.pending_events()

    async def info(self) -> str:
        """The reader's name and version (INFO)."""
        return await self.in_thread(self._info_sync)

    # -- Reader (worker thread) -----------------------------------------------------------------

    def _open_link(self) -> CardLink:
        if self._must_power_cycle:
            # A reset was owed (e.g. after a PIN verification) but could not be sent: power
            # off first, since POWER_ON alone keeps a powered card's state.
            self._exchange(Command.POWER_OFF)
            self._must_power_cycle = False
        result, atr = self._exchange(Command.POWER_ON)
        if result is Result.NO_CARD:
            raise NoCardError("no card in the reader")
        if result is Result.CARD_MUTE:
            raise LinkError("the card does not answer to power-on")
        self._check(Command.POWER_ON, result)
        return _SerialLink(self, atr)

    def _close_link(self, link: CardLink, reset: bool) -> None:
        if not reset:
            return
        # Power off rather than reset: the next operation's POWER_ON starts cold anyway. If
        # that cannot be done now, the next operation power-cycles before anything else.
        self._must_power_cycle = True
        if self._ser is not None and not self._unanswered:
            self._exchange(Command.POWER_OFF)
            self._must_power_cycle = False

    def _card_present(self) -> bool:
        try:
            result, payload = self._exchange(Command.STATUS)
            self._check(Command.STATUS, result)
            return parse_status_reply(payload) is not SlotStatus.NO_CARD
        except FrameError as exc:
            raise map_link_error(LinkError(f"bad STATUS reply: {exc}"), self.name) from None
        except LinkError as exc:
            raise map_link_error(exc, self.name) from None

    def _shutdown(self) -> None:
        self._drop_port()

    def _poll_sync(self) -> None:
        try:
            ser = self._port()
            while (chunk := self._read(ser, wait=False)):
                self._sort(self._decoder.feed(chunk), None, 0)
        except LinkError as exc:
            raise map_link_error(exc, self.name) from None

    def _info_sync(self) -> str:
        try:
            result, payload = self._exchange(Command.INFO)
            self._check(Command.INFO, result)
        except LinkError as exc:
            raise map_link_error(exc, self.name) from None
        return payload.decode("ascii", "replace")

    # -- protocol (worker thread) ---------------------------------------------------------------

    def _keypad(self, cmd: Command, timeout: float) -> KeypadResult:
        data = keypad_request(timeout)
        # The reader answers after the person is done (or its keypad timeout): wait that long too.
        result, payload = self._exchange(cmd, data, data[0] + self.reply_timeout)
        self._check(cmd, result)
        try:
            status, sw = parse_keypad_reply(payload)
        except FrameError as exc:
            raise LinkError(f"bad keypad reply: {exc}") from None
        return KeypadResult(status, sw)

    def _check(self, cmd: Command, result: Result) -> None:
        """Turn a reply's result into the link error it means (OK passes)."""
        if result is Result.OK:
            return
        if result in (Result.NO_CARD, Result.CARD_MUTE):
            raise CardRemovedError("card removed")
        if result is Result.UNKNOWN_CMD and cmd in (Command.KEYPAD_VERIFY, Command.KEYPAD_CHANGE):
            raise KeypadUnsupported("the reader has no keypad")
        raise LinkError(f"the reader answered {result.name} to {cmd.name}")

    def _next_seq(self) -> int:
        self._seq = self._seq % 255 + 1  # 1 … 255; 0 is the reader's
        return self._seq

    def _exchange(self, cmd: Command, data: bytes = b"",
                  timeout: float | None = None) -> tuple[Result, bytes]:
        """Send one request and wait for its reply; one retransmission after BAD_FRAME."""
        ser = self._port()
        seq = self._next_seq()
        frame = encode_frame(seq, cmd, data)
        wait = self.reply_timeout if timeout is None else timeout
        self._unanswered = False
        for attempt in range(2):
            self._write(ser, frame)
            result, payload = self._await_reply(ser, seq, cmd, wait)
            if result is not Result.BAD_FRAME:
                return result, payload
            log.debug("serial reader refused a frame as garbled", cmd=cmd.name, attempt=attempt + 1)
        raise ReaderChecksumError("the reader keeps refusing our frames as garbled")

    def _await_reply(self, ser: serial.Serial, seq: int, cmd: Command,
                     timeout: float) -> tuple[Result, bytes]:
        deadline = time.monotonic() + timeout
        while True:
            chunk = self._read(ser, wait=True)
            if chunk:
                items = self._decoder.feed(chunk)
            elif self._decoder.pending:  # idle mid-frame: abandon it (see serial_frame)
                items = self._decoder.flush()
            else:
                items = []
            reply = self._sort(items, seq, cmd)
            if reply is not None:
                return reply
            if time.monotonic() >= deadline:
                self._unanswered = True
                raise LinkError(f"no answer from the reader to {cmd.name} within {timeout:.1f} s")

    def _sort(self, items: list[Frame | BadFrame], seq: int | None, cmd: int) -> tuple[Result, bytes] | None:
        """Events to the queue, stale replies away; returns the awaited reply if among ``items``."""
        want = (cmd | REPLY_BIT) & 0xFF
        found: tuple[Result, bytes] | None = None
        error: LinkError | None = None  # raised after the batch, so no event in it is lost
        for item in items:
            if isinstance(item, BadFrame):
                if item.well_framed and seq is not None and (item.seq, item.cmd) == (seq, want):
                    # Our reply, garbled: the command may have run, so it is not retried.
                    error = error or ReaderChecksumError("the reader's reply failed its checksum")
                log.debug("serial line: rejected frame", reason=item.reason)
            elif item.is_event:
                self._card_event(item)
            elif found is None and error is None and seq is not None and (item.seq, item.cmd) == (seq, want):
                try:
                    found = parse_reply(item)
                except FrameError as exc:
                    error = LinkError(f"bad reply from the reader: {exc}")
            else:
                log.debug("serial line: discarded a stale frame", frame=describe(item))
        if error is not None and found is None:
            raise error
        return found

    def _card_event(self, frame: Frame) -> None:
        try:
            event, atr = parse_event(frame)
        except FrameError:
            log.debug("serial line: malformed card event")
            return
        kind = ReaderEventKind.CARD_INSERTED if event is CardEvent.INSERTED else ReaderEventKind.CARD_REMOVED
        ev = ReaderEvent(kind, self.name, atr)
        self._events.put(ev)
        log.info("serial reader card event", reader=self.name, card_event=kind.value)
        if self._on_event is not None:
            try:
                self._on_event(ev)
            except Exception:  # a listener's bug must not break the line
                log.exception("card event callback failed", reader=self.name)

    # -- the line (worker thread) ---------------------------------------------------------------

    def _port(self) -> serial.Serial:
        if self._ser is not None:
            return self._ser
        try:
            ser = serial.Serial(self.port, baudrate=self.baudrate, timeout=INTER_BYTE_TIMEOUT,
                                write_timeout=self.reply_timeout, exclusive=True)
        except (serial.SerialException, OSError, ValueError) as exc:
            raise ReaderGoneError(f"cannot open {self.port}: {exc}") from None
        try:
            ser.reset_input_buffer()  # what the reader said before we listened is stale
        except (serial.SerialException, OSError) as exc:
            ser.close()
            raise ReaderGoneError(f"cannot use {self.port}: {exc}") from None
        self._ser = ser
        self._decoder = FrameDecoder()
        log.info("serial reader line open", reader=self.name)
        return ser

    def _drop_port(self) -> None:
        ser, self._ser = self._ser, None
        if ser is not None:
            with contextlib.suppress(Exception):
                ser.close()

    def _read(self, ser: serial.Serial, wait: bool) -> bytes:
        """What has arrived; with ``wait``, blocks up to INTER_BYTE_TIMEOUT for the first byte."""
        try:
            n = ser.in_waiting
            if not n and not wait:
                return b""
            data: bytes = ser.read(n or 1)
            return data
        except (serial.SerialException, OSError) as exc:
            self._drop_port()
            raise ReaderGoneError(f"serial line failed: {exc}") from None

    def _write(self, ser: serial.Serial, frame: bytes) -> None:
        try:
            ser.write(frame)
        except serial.SerialTimeoutException:
            raise LinkError("the reader does not take our frames") from None
        except (serial.SerialException, OSError) as exc:
            self._drop_port()
            raise ReaderGoneError(f"serial line failed: {exc}") from None
