"""The serial keypad reader's firmware: an emulated card and a scripted PIN keypad behind a serial
line (in practice the master side of a pty), speaking :mod:`apdu_specs.serial_frame`.

The keypad PINs never leave this process: :class:`~firmware_sim.keypad.KeypadFirmware` collects
them, builds VERIFY / CHANGE PIN itself and enforces the initial-PIN rules (−35, −36) from its
:class:`~firmware_sim.keypad.KeypadConfig`; the host only learns the outcome and the status word.
Nothing here logs a frame's bytes or a keypad entry.

The card can be removed and inserted from any thread (:meth:`SerialReaderFirmware.remove`,
:meth:`~SerialReaderFirmware.insert`); each change is announced with a CARD_EVENT frame. Garbage
on the line is skipped, a garbled request is answered BAD_FRAME, and nothing a host sends raises
out of the serve loop.

Fault hooks for tests: :attr:`~SerialReaderFirmware.mute` (ignore requests),
:attr:`~SerialReaderFirmware.nak_next` (refuse the next n requests as garbled),
:attr:`~SerialReaderFirmware.garble_next_reply` (corrupt the CRC of the next n replies) and
:meth:`~SerialReaderFirmware.inject` (raw bytes to the host).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import select
import threading
import time
import tty
from dataclasses import dataclass

from apdu_specs.serial_frame import (
    DUPLICATE_WINDOW,
    EVENT_SEQ,
    INTER_BYTE_TIMEOUT,
    BadFrame,
    CardEvent,
    Command,
    Frame,
    FrameDecoder,
    FrameError,
    KeypadStatus,
    Result,
    SlotStatus,
    describe,
    event_frame,
    keypad_reply,
    parse_keypad_request,
    reply_frame,
)
from firmware_sim.keypad import KeypadConfig, KeypadFirmware, ScriptedKeypad
from firmware_sim.vpcd import Card

log = logging.getLogger(__name__)

READER_INFO = "sscard-emu serial keypad reader 1.0"
MAX_R_APDU = 258  # a result byte and a short R-APDU fill DATA
WRITE_TIMEOUT = 1.0  # a host that does not read for this long loses the frame, not the reader


class _CardGone(Exception):
    """The card was removed (or re-inserted, so unpowered) while a command needed it."""


@dataclass
class _Cached:
    seq: int
    cmd: int
    data: bytes
    reply: bytes
    at: float


def open_pty() -> tuple[int, int, str]:
    """A pty pair in raw mode: ``(master_fd, slave_fd, slave_path)``.

    Raw mode matters: in cooked mode the line discipline would echo frames back, turn 0x03 (ETX)
    into SIGINT and swallow 0x11/0x13 (POWER_OFF, XOFF) as flow control.
    """
    master, slave = os.openpty()
    tty.setraw(slave)
    return master, slave, os.ttyname(slave)


class SerialReaderFirmware:
    """Answers frames on ``fd`` for one card slot with a PIN keypad.

    ``serve()`` blocks (run it in a thread, or use :meth:`start`); :meth:`close` stops it and
    closes ``fd`` and any ``extra_fds`` handed over (the CLI keeps its own copy of the pty slave
    open, so the master never sees a hang-up while no daemon has the line open).
    """

    def __init__(self, fd: int, card: Card, keypad: ScriptedKeypad | None = None,
                 config: KeypadConfig | None = None, *, inserted: bool = True,
                 info: str = READER_INFO, extra_fds: tuple[int, ...] = ()):
        self.fd = fd
        self.card = card
        self.keypad = keypad or ScriptedKeypad()
        self.firmware = KeypadFirmware(self.keypad, config or KeypadConfig())
        self.info = info
        self.inserted = inserted
        self.powered = False
        self._extra_fds = extra_fds
        self._state_lock = threading.Lock()  # presence/power against card commands
        self._write_lock = threading.Lock()  # one frame at a time on the wire
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._decoder = FrameDecoder()
        self._last: _Cached | None = None
        # fault hooks (tests)
        self.mute = False
        self.nak_next = 0
        self.garble_next_reply = 0
        # counters
        self.frames = 0
        self.bad_frames = 0
        self.duplicates = 0
        self.apdus = 0
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
        if inserted:
            card.power_off()  # inserted, waiting for POWER_ON

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve, name="serial-reader", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 2.0) -> None:
        """Stop serving and close the line (the host then sees the reader gone)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        for fd in (self.fd, *self._extra_fds):
            with contextlib.suppress(OSError):
                os.close(fd)

    def serve(self) -> None:
        """Answer frames until :meth:`close` (or the line is closed under us)."""
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([self.fd], [], [], INTER_BYTE_TIMEOUT)
            except (OSError, ValueError):
                return  # fd closed
            if not ready:
                if self._decoder.pending:  # idle mid-frame: abandon it (see serial_frame)
                    self._dispatch(self._decoder.flush())
                continue
            try:
                chunk = os.read(self.fd, 4096)
            except BlockingIOError:
                continue
            except OSError as exc:
                if exc.errno == errno.EIO:  # no host has the line open; wait for one
                    self._stop.wait(INTER_BYTE_TIMEOUT)
                    continue
                if exc.errno == errno.EINTR:
                    continue
                log.warning("serial line read failed (%s); stopping", exc.strerror)
                return
            if not chunk:
                self._stop.wait(INTER_BYTE_TIMEOUT)
                continue
            self._dispatch(self._decoder.feed(chunk))

    # -- card presence (any thread) -----------------------------------------------------------

    def remove(self) -> None:
        """Pull the card out (announced with a CARD_EVENT)."""
        with self._state_lock:
            if not self.inserted:
                return
            self.inserted = False
            self.powered = False
            self.card.power_off()
        log.info("card removed")
        self._write(event_frame(CardEvent.REMOVED))

    def insert(self) -> None:
        """Put the card in (unpowered until the host's POWER_ON; announced with its ATR)."""
        with self._state_lock:
            if self.inserted:
                return
            self.inserted = True
            self.powered = False
            atr = self.card.atr
        log.info("card inserted")
        self._write(event_frame(CardEvent.INSERTED, atr))

    def inject(self, raw: bytes) -> None:
        """Write raw bytes to the host (fault injection: line noise, forged frames)."""
        self._write(raw)

    # -- frames -------------------------------------------------------------------------------

    def _dispatch(self, items: list[Frame | BadFrame]) -> None:
        for item in items:
            if isinstance(item, BadFrame):
                self.bad_frames += 1
                log.debug("rejected frame candidate: %s, LEN %d", item.reason, item.length)
                if item.well_framed and item.seq and item.cmd is not None:
                    self._write(reply_frame(item.seq, item.cmd, Result.BAD_FRAME))
                continue
            self.frames += 1
            if item.is_reply or item.is_event:
                continue  # our own frames echoed back by a line in echo mode
            try:
                self._answer(item)
            except Exception as exc:  # a bug here must not take the reader down
                log.error("internal error answering %s: %s", describe(item)["cmd"], type(exc).__name__)

    def _answer(self, req: Frame) -> None:
        if self.mute:
            return
        if self.nak_next > 0:
            self.nak_next -= 1
            self._write(reply_frame(req.seq, req.cmd, Result.BAD_FRAME))
            return
        last = self._last
        if (last is not None and (last.seq, last.cmd, last.data) == (req.seq, req.cmd, req.data)
                and time.monotonic() - last.at < DUPLICATE_WINDOW):
            # A retransmission of the request we just answered: answer again, do not re-execute.
            self.duplicates += 1
            self._write(last.reply)
            return
        log.debug("request %s", describe(req))
        result, payload = self._execute(req)
        reply = reply_frame(req.seq, req.cmd, result, payload)
        self._last = _Cached(req.seq, req.cmd, req.data, reply, time.monotonic())
        if self.garble_next_reply > 0:
            self.garble_next_reply -= 1
            reply = reply[:-3] + bytes((reply[-3] ^ 0xFF,)) + reply[-2:]
        self._write(reply)

    def _execute(self, req: Frame) -> tuple[Result, bytes]:
        if req.seq == EVENT_SEQ:
            return Result.BAD_PARAMETER, b""
        cmd = req.cmd
        if cmd == Command.INFO:
            return Result.OK, self.info.encode("ascii", "replace")
        if cmd == Command.STATUS:
            if req.data:
                return Result.BAD_PARAMETER, b""
            with self._state_lock:
                slot = (SlotStatus.POWERED if self.powered else SlotStatus.PRESENT) if self.inserted \
                    else SlotStatus.NO_CARD
            return Result.OK, bytes((slot,))
        if cmd == Command.POWER_ON:
            if req.data:
                return Result.BAD_PARAMETER, b""
            with self._state_lock:
                if not self.inserted:
                    return Result.NO_CARD, b""
                if not self.powered:  # idempotent: a powered card keeps its state
                    self.card.power_on()
                    self.powered = True
                return Result.OK, self.card.atr
        if cmd == Command.POWER_OFF:
            if req.data:
                return Result.BAD_PARAMETER, b""
            with self._state_lock:
                if self.inserted and self.powered:
                    self.card.power_off()
                self.powered = False
            return Result.OK, b""
        if cmd == Command.APDU:
            if len(req.data) < 4:
                return Result.BAD_PARAMETER, b""
            try:
                resp = self._card_execute(req.data)
            except _CardGone:
                return self._gone_result(), b""
            if not 2 <= len(resp) <= MAX_R_APDU:
                return Result.CARD_MUTE, b""
            return Result.OK, resp
        if cmd in (Command.KEYPAD_VERIFY, Command.KEYPAD_CHANGE):
            try:
                parse_keypad_request(req.data)  # the scripted keypad answers at once
            except FrameError:
                return Result.BAD_PARAMETER, b""
            with self._state_lock:
                if not (self.inserted and self.powered):  # no point asking for a PIN
                    return self._gone_result_locked(), b""
            run = self.firmware.verify if cmd == Command.KEYPAD_VERIFY else self.firmware.change
            try:
                outcome, sw = run(self._card_execute)
            except _CardGone:
                return self._gone_result(), b""
            return Result.OK, keypad_reply(KeypadStatus(outcome), sw)
        return Result.UNKNOWN_CMD, b""

    def _card_execute(self, apdu: bytes) -> bytes:
        with self._state_lock:
            if not (self.inserted and self.powered):
                raise _CardGone
            self.apdus += 1
            return self.card.execute(apdu)

    def _gone_result(self) -> Result:
        with self._state_lock:
            return self._gone_result_locked()

    def _gone_result_locked(self) -> Result:
        return Result.CARD_MUTE if self.inserted else Result.NO_CARD

    def _write(self, frame: bytes) -> None:
        """Write one frame whole; a host that stops reading loses it after WRITE_TIMEOUT."""
        with self._write_lock:
            view = memoryview(frame)
            deadline = time.monotonic() + WRITE_TIMEOUT
            while view:
                try:
                    n = os.write(self.fd, view)
                    view = view[n:]
                    continue
                except BlockingIOError:
                    pass
                except OSError as exc:
                    log.debug("serial line write failed (%s); frame dropped", exc.strerror)
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning("host not reading; dropped a %d-byte frame", len(frame))
                    return
                try:
                    select.select([], [self.fd], [], left)
                except (OSError, ValueError):
                    return
