"""The serial keypad reader end to end: its firmware on a pty's master, ``SerialReader`` on the slave.

Most tests run the firmware in a thread; one runs ``sscard-emu serve --serial`` as a process.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from apdu_specs.serial_frame import (
    CardEvent,
    Command,
    Frame,
    FrameDecoder,
    KeypadStatus,
    Result,
    encode_frame,
    event_frame,
    parse_reply,
    reply_frame,
)
from firmware_sim.keypad import TIMEOUT, KeypadConfig, ScriptedKeypad
from firmware_sim.serial_reader import SerialReaderFirmware, open_pty
from firmware_sim.sscard import SocialSecurityCard
from sscardd.errors import SSCardError
from sscardd.readers.base import CardLink, KeypadResult, ReaderEvent, ReaderEventKind
from sscardd.readers.serial import SerialReader
from sscardd.transport import Exchanger
from tests.emu import SELECT_SSSE, new_card

GOOD = "246810"
NEW = "135790"
INITIAL = "123456"
VERIFY_QUERY = bytes.fromhex("00200000")


@dataclass
class Pty:
    fw: SerialReaderFirmware
    card: SocialSecurityCard
    keypad: ScriptedKeypad
    path: str
    slave: int  # our own copy of the slave: keeps the line up, and lets tests write to the reader

    def type(self, *entries: str | None) -> None:
        self.keypad.type(*entries)


@pytest.fixture
def make_pty() -> Iterator[Callable[..., Pty]]:
    made: list[Pty] = []

    def make(pin: str = GOOD, initial: tuple[str, ...] = (INITIAL,), inserted: bool = True) -> Pty:
        master, slave, path = open_pty()
        card = new_card(pin=pin)
        keypad = ScriptedKeypad()
        fw = SerialReaderFirmware(master, card, keypad, KeypadConfig(initial_pins=initial), inserted=inserted)
        fw.start()
        p = Pty(fw, card, keypad, path, slave)
        made.append(p)
        return p

    yield make
    for p in made:
        p.fw.close()
        with contextlib.suppress(OSError):
            os.close(p.slave)
        assert p.fw._thread is None or not p.fw._thread.is_alive()


@pytest.fixture
def pty(make_pty: Callable[..., Pty]) -> Pty:
    return make_pty()


@pytest.fixture
async def reader(pty: Pty) -> AsyncIterator[SerialReader]:
    r = SerialReader(f"serial:{pty.path}", reply_timeout=1.0)
    try:
        yield r
    finally:
        await r.close()


async def code_of(coro: object) -> str:
    with pytest.raises(SSCardError) as ei:
        await asyncio.wait_for(coro, 10)  # type: ignore[arg-type]
    return ei.value.code


def select_ssse(link: CardLink) -> tuple[bytes, int]:
    r = Exchanger(link).send(bytes.fromhex(SELECT_SSSE))
    return r.data, r.sw


def verify_query(link: CardLink) -> int:
    return Exchanger(link).send(VERIFY_QUERY).sw


async def keypad_verify(reader: SerialReader) -> KeypadResult:
    return await asyncio.wait_for(reader.run(lambda link: link.keypad_verify(30)), 10)


async def keypad_change(reader: SerialReader) -> KeypadResult:
    return await asyncio.wait_for(reader.run(lambda link: link.keypad_change(30)), 10)


# -- APDUs ------------------------------------------------------------------------------------------

async def test_select_ssse_gives_the_fci(reader: SerialReader, pty: Pty) -> None:
    data, sw = await reader.run(select_ssse)
    assert sw == 0x9000 and data[:1] == b"\x6f" and data[-3:] == b"\x86\x01\x03"
    assert await reader.run(lambda link: link.atr) == pty.card.atr
    assert await reader.present()
    assert (await reader.info()).startswith("sscard-emu serial keypad reader")


async def test_t0_responses_go_through_get_response(make_pty: Callable[..., Pty]) -> None:
    from firmware_sim.cos import ResponseMode

    p = make_pty()
    p.card.mode = ResponseMode.T0
    r = SerialReader(p.path)
    try:
        data, sw = await r.run(select_ssse)
        assert sw == 0x9000 and data[:1] == b"\x6f"
    finally:
        await r.close()


async def test_reset_clears_the_verified_pin(reader: SerialReader, pty: Pty) -> None:
    pty.type(GOOD)

    def op(link: CardLink) -> tuple[int, int, int]:
        Exchanger(link).send(bytes.fromhex(SELECT_SSSE))
        verified = link.keypad_verify(30).sw
        before = verify_query(link)
        link.reset()
        Exchanger(link).send(bytes.fromhex(SELECT_SSSE))
        return verified, before, verify_query(link)

    verified, before, after = await reader.run(op)
    assert (verified, before) == (0x9000, 0x9000) and after & 0xFFF0 == 0x63C0


async def test_a_verification_does_not_survive_reset_after(reader: SerialReader, pty: Pty) -> None:
    pty.type(GOOD)
    assert (await keypad_verify(reader)).status is KeypadStatus.OK
    assert await reader.run(verify_query) == 0x9000  # same power session: still verified
    await reader.run(lambda link: None, reset_after=True)
    assert await reader.run(verify_query) & 0xFFF0 == 0x63C0


# -- keypad -----------------------------------------------------------------------------------------

async def test_keypad_verify_right_pin(reader: SerialReader, pty: Pty) -> None:
    pty.type(GOOD)
    assert await keypad_verify(reader) == KeypadResult(KeypadStatus.OK, 0x9000)


async def test_keypad_verify_wrong_pin(reader: SerialReader, pty: Pty) -> None:
    pty.type("999999")
    assert await keypad_verify(reader) == KeypadResult(KeypadStatus.CARD_STATUS, 0x63C2)


async def test_keypad_verify_initial_pin(make_pty: Callable[..., Pty]) -> None:
    p = make_pty(pin=INITIAL, initial=(INITIAL,))
    r = SerialReader(p.path)
    try:
        p.type(INITIAL)
        assert await keypad_verify(r) == KeypadResult(KeypadStatus.INITIAL_PIN, 0x9000)
    finally:
        await r.close()


@pytest.mark.parametrize(("entry", "status"), [
    (None, KeypadStatus.CANCELLED), (TIMEOUT, KeypadStatus.TIMEOUT), ("12", KeypadStatus.BAD_LENGTH),
    ("1234567890123", KeypadStatus.BAD_LENGTH),
])
async def test_keypad_verify_without_touching_the_card(reader: SerialReader, pty: Pty, entry: str | None,
                                                       status: KeypadStatus) -> None:
    pty.type(entry)
    apdus = pty.fw.apdus
    assert await keypad_verify(reader) == KeypadResult(status, 0)
    assert pty.fw.apdus == apdus


async def test_an_empty_keypad_script_times_out(reader: SerialReader) -> None:
    assert (await keypad_verify(reader)).status is KeypadStatus.TIMEOUT


async def test_keypad_change_mismatch(reader: SerialReader, pty: Pty) -> None:
    pty.type(GOOD, NEW, "135791")
    apdus = pty.fw.apdus
    assert await keypad_change(reader) == KeypadResult(KeypadStatus.MISMATCH, 0)
    assert pty.fw.apdus == apdus


async def test_keypad_change_to_an_initial_pin_leaves_the_card_alone(reader: SerialReader, pty: Pty) -> None:
    pty.type(GOOD, INITIAL, INITIAL)
    apdus = pty.fw.apdus
    assert await keypad_change(reader) == KeypadResult(KeypadStatus.TO_INITIAL, 0)
    assert pty.fw.apdus == apdus
    pty.type(GOOD)
    assert await keypad_verify(reader) == KeypadResult(KeypadStatus.OK, 0x9000)  # PIN unchanged


async def test_keypad_change_then_verify_the_new_pin(reader: SerialReader, pty: Pty) -> None:
    pty.type(GOOD, NEW, NEW)
    assert await keypad_change(reader) == KeypadResult(KeypadStatus.OK, 0x9000)
    pty.type(GOOD)
    assert await keypad_verify(reader) == KeypadResult(KeypadStatus.CARD_STATUS, 0x63C2)
    pty.type(NEW)
    assert await keypad_verify(reader) == KeypadResult(KeypadStatus.OK, 0x9000)


async def test_keypad_change_with_a_wrong_old_pin(reader: SerialReader, pty: Pty) -> None:
    pty.type("999999", NEW, NEW)
    assert await keypad_change(reader) == KeypadResult(KeypadStatus.CARD_STATUS, 0x63C2)


async def test_a_reader_without_keypad_is_unsupported(reader: SerialReader, pty: Pty,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    real = pty.fw._execute

    def no_keypad(req: Frame) -> tuple[Result, bytes]:
        if req.cmd in (Command.KEYPAD_VERIFY, Command.KEYPAD_CHANGE):
            return Result.UNKNOWN_CMD, b""
        return real(req)

    monkeypatch.setattr(pty.fw, "_execute", no_keypad)
    assert await code_of(reader.run(lambda link: link.keypad_verify(5))) == "UNSUPPORTED"


# -- presence, removal, the line going away ---------------------------------------------------------

async def test_no_card(make_pty: Callable[..., Pty]) -> None:
    p = make_pty(inserted=False)
    seen: list[ReaderEvent] = []
    r = SerialReader(p.path, on_event=seen.append)
    try:
        assert await code_of(r.run(select_ssse)) == "NO_CARD"
        assert not await r.present()
        p.fw.insert()
        assert await r.present()
        assert (await r.run(select_ssse))[1] == 0x9000
        assert [e.kind for e in r.pending_events()] == [ReaderEventKind.CARD_INSERTED]
        assert seen[0].atr == p.card.atr and seen[0].reader == r.name
    finally:
        await r.close()


async def test_card_removed_mid_operation(reader: SerialReader, pty: Pty) -> None:
    def op(link: CardLink) -> None:
        Exchanger(link).send(bytes.fromhex(SELECT_SSSE))
        pty.fw.remove()
        Exchanger(link).send(bytes.fromhex(SELECT_SSSE))

    assert await code_of(reader.run(op)) == "CARD_REMOVED"
    assert [e.kind for e in reader.pending_events()] == [ReaderEventKind.CARD_REMOVED]
    assert await code_of(reader.run(select_ssse)) == "NO_CARD"
    pty.fw.insert()
    assert (await reader.run(select_ssse))[1] == 0x9000


async def test_card_swapped_between_power_on_and_keypad(reader: SerialReader, pty: Pty) -> None:
    pty.type(GOOD)

    def op(link: CardLink) -> KeypadResult:
        pty.fw.remove()
        pty.fw.insert()  # back in, but unpowered: this power session is over
        return link.keypad_verify(30)

    assert await code_of(reader.run(op)) == "CARD_REMOVED"
    assert list(pty.keypad.entries) == [GOOD]  # nobody was asked for a PIN
    assert [e.kind for e in await reader.poll_events()] == [ReaderEventKind.CARD_REMOVED,
                                                             ReaderEventKind.CARD_INSERTED]


async def test_events_while_idle_are_polled(reader: SerialReader, pty: Pty) -> None:
    await reader.run(select_ssse)
    pty.fw.remove()
    deadline = time.monotonic() + 5
    events: list[ReaderEvent] = []
    while not events and time.monotonic() < deadline:
        events = await reader.poll_events()
        await asyncio.sleep(0.01)
    assert [e.kind for e in events] == [ReaderEventKind.CARD_REMOVED]


async def test_pty_closed_is_reader_gone(reader: SerialReader, pty: Pty) -> None:
    await reader.run(select_ssse)
    pty.fw.close()
    assert await code_of(reader.run(select_ssse)) == "READER_GONE"
    assert await code_of(reader.run(select_ssse)) == "READER_GONE"


async def test_a_missing_port_is_reader_gone(tmp_path: Path) -> None:
    r = SerialReader(str(tmp_path / "no-such-tty"))
    try:
        assert await code_of(r.run(select_ssse)) == "READER_GONE"
        assert await code_of(r.present()) == "READER_GONE"
    finally:
        await r.close()


async def test_a_mute_reader_is_no_answer(make_pty: Callable[..., Pty]) -> None:
    p = make_pty()
    r = SerialReader(p.path, reply_timeout=0.3)
    try:
        p.fw.mute = True
        t = time.monotonic()
        assert await code_of(r.run(select_ssse)) == "CARD_NO_ANSWER"
        assert time.monotonic() - t < 1.5  # no second wait to power off an unanswering reader
        p.fw.mute = False
        assert (await r.run(select_ssse))[1] == 0x9000  # the late nothing is not mistaken later
    finally:
        await r.close()


# -- a noisy line -----------------------------------------------------------------------------------

NOISE = [
    b"\x00\xff\x55garbage\x03\x03",
    b"\x02\x00\x40\x01",  # a stray STX with a plausible length: held until the line idles
    b"\x02\xff\xff\x02",  # an impossible length
    bytes(range(256)),
    encode_frame(7, Command.APDU)[:-3] + b"\x00\x00\x03",  # well framed, bad CRC
]


async def test_garbage_between_frames_is_survived(reader: SerialReader, pty: Pty) -> None:
    for noise in NOISE:
        pty.fw.inject(noise)  # reader → host
        os.write(pty.slave, noise)  # host → reader
        data, sw = await reader.run(select_ssse)
        assert sw == 0x9000 and data[:1] == b"\x6f"
    pty.type(GOOD)
    assert (await keypad_verify(reader)).status is KeypadStatus.OK
    assert pty.fw.bad_frames > 0


async def test_a_stale_reply_is_discarded(reader: SerialReader, pty: Pty) -> None:
    await reader.run(select_ssse)
    # A late reply to the last request, and one to the next: only SEQ tells them apart.
    pty.fw.inject(reply_frame(reader._seq, Command.POWER_ON, Result.NO_CARD))
    pty.fw.inject(reply_frame(reader._seq, Command.APDU, Result.OK, b"\x6a\x82"))
    pty.fw.inject(event_frame(CardEvent.INSERTED, b"\x3b"))
    await asyncio.sleep(0.05)
    assert (await reader.run(select_ssse))[1] == 0x9000
    assert [e.kind for e in reader.pending_events()] == [ReaderEventKind.CARD_INSERTED]


async def test_a_garbled_request_is_retransmitted_once(reader: SerialReader, pty: Pty) -> None:
    pty.fw.nak_next = 1
    assert (await reader.run(select_ssse))[1] == 0x9000
    pty.fw.nak_next = 2
    assert await code_of(reader.run(select_ssse)) == "READER_CHECKSUM"
    assert (await reader.run(select_ssse))[1] == 0x9000


async def test_a_garbled_reply_is_a_checksum_error_not_a_retry(reader: SerialReader, pty: Pty) -> None:
    pty.type("999999", "999999")

    def op(link: CardLink) -> KeypadResult:
        pty.fw.garble_next_reply = 1
        return link.keypad_verify(30)

    assert await code_of(reader.run(op)) == "READER_CHECKSUM"
    assert pty.keypad.entries == type(pty.keypad.entries)(["999999"])  # ran once, not twice
    assert (await reader.run(select_ssse))[1] == 0x9000


# -- the firmware, frame by frame -------------------------------------------------------------------

class Wire:
    """Raw frames on the slave side of a pty (no SerialReader)."""

    def __init__(self, slave: int):
        self.fd = slave
        self.decoder = FrameDecoder()
        self.frames: list[Frame] = []

    def send(self, raw: bytes) -> None:
        os.write(self.fd, raw)

    def next(self, timeout: float = 2.0) -> Frame:
        deadline = time.monotonic() + timeout
        while not self.frames:
            left = deadline - time.monotonic()
            assert left > 0, "no frame from the reader"
            if select.select([self.fd], [], [], left)[0]:
                self.frames += [f for f in self.decoder.feed(os.read(self.fd, 4096)) if isinstance(f, Frame)]
        return self.frames.pop(0)

    def ask(self, seq: int, cmd: int, data: bytes = b"") -> tuple[Result, bytes]:
        self.send(encode_frame(seq, cmd, data))
        frame = self.next()
        assert (frame.seq, frame.cmd) == (seq, (cmd | 0x80) & 0xFF)
        return parse_reply(frame)


def test_firmware_refusals(pty: Pty) -> None:
    w = Wire(pty.slave)
    assert w.ask(1, 0x55) == (Result.UNKNOWN_CMD, b"")
    assert w.ask(2, Command.POWER_ON, b"\x00") == (Result.BAD_PARAMETER, b"")
    assert w.ask(0, Command.POWER_ON) == (Result.BAD_PARAMETER, b"")  # SEQ 0 is the reader's
    assert w.ask(3, Command.KEYPAD_VERIFY, b"\x00") == (Result.BAD_PARAMETER, b"")
    assert w.ask(4, Command.APDU, b"\x00\xa4") == (Result.BAD_PARAMETER, b"")
    assert w.ask(5, Command.APDU, bytes.fromhex(SELECT_SSSE)) == (Result.CARD_MUTE, b"")  # not powered
    assert w.ask(6, Command.STATUS) == (Result.OK, b"\x01")
    assert w.ask(7, Command.POWER_ON)[0] is Result.OK
    assert w.ask(8, Command.STATUS) == (Result.OK, b"\x02")
    # A reply-shaped frame (our own output echoed back) is ignored, not answered.
    w.send(reply_frame(9, Command.STATUS, Result.OK, b"\x02"))
    assert w.ask(10, Command.POWER_OFF) == (Result.OK, b"")
    assert w.ask(11, Command.POWER_OFF) == (Result.OK, b"")
    pty.fw.remove()
    assert w.next().cmd == Command.CARD_EVENT
    assert w.ask(12, Command.POWER_ON) == (Result.NO_CARD, b"")
    assert w.ask(13, Command.KEYPAD_CHANGE, b"\x05") == (Result.NO_CARD, b"")


def test_firmware_answers_a_garbled_request_bad_frame(pty: Pty) -> None:
    w = Wire(pty.slave)
    raw = bytearray(encode_frame(21, Command.APDU, bytes.fromhex(SELECT_SSSE)))
    raw[8] ^= 0x10
    w.send(bytes(raw))
    frame = w.next()
    assert (frame.seq, frame.cmd) == (21, Command.APDU | 0x80)
    assert parse_reply(frame) == (Result.BAD_FRAME, b"")
    assert pty.fw.apdus == 0


def test_a_retransmitted_request_runs_once(pty: Pty) -> None:
    w = Wire(pty.slave)
    assert w.ask(1, Command.POWER_ON)[0] is Result.OK
    assert w.ask(2, Command.APDU, bytes.fromhex(SELECT_SSSE))[1][-2:] == b"\x90\x00"
    wrong = bytes.fromhex("0020000003999999")
    first = w.ask(3, Command.APDU, wrong)
    assert first == (Result.OK, b"\x63\xc2")
    assert w.ask(3, Command.APDU, wrong) == first  # the same SEQ again: answered from the cache
    assert pty.fw.duplicates == 1
    assert w.ask(4, Command.APDU, VERIFY_QUERY) == (Result.OK, b"\x63\xc2")  # one try spent, not two
    assert w.ask(5, Command.APDU, wrong) == (Result.OK, b"\x63\xc1")  # a new SEQ runs


def test_the_firmware_survives_random_bytes(pty: Pty) -> None:
    w = Wire(pty.slave)
    rnd = os.urandom(20000)
    for i in range(0, len(rnd), 997):
        w.send(rnd[i:i + 997])
    w.send(encode_frame(77, Command.STATUS))
    frame = w.next()
    while (frame.seq, frame.cmd) != (77, Command.STATUS | 0x80):  # skip refusals of the noise
        frame = w.next()
    assert parse_reply(frame) == (Result.OK, b"\x01")
    assert pty.fw._thread is not None and pty.fw._thread.is_alive()


# -- sscard-emu serve --serial, as a process -------------------------------------------------------

def test_serve_serial_process(tmp_path: Path) -> None:
    from firmware_sim.cli import main as emu_main

    image = tmp_path / "card.json"
    assert emu_main(["issue", "--out", str(image), "--pin", GOOD]) == 0
    link = tmp_path / "reader"
    proc = subprocess.Popen(
        [sys.executable, "-m", "firmware_sim.cli", "-vv", "serve", "--card", str(image), "--serial",
         "--serial-link", str(link), "--keypad", f"{GOOD},cancel,975319", "--initial-pin", INITIAL],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert select.select([proc.stdout], [], [], 15)[0], "serve printed nothing"
        banner = proc.stdout.readline()
        assert "serial keypad reader" in banner and link.is_symlink()

        async def scenario() -> None:
            r = SerialReader(f"serial:{link}")
            try:
                assert (await r.run(select_ssse))[1] == 0x9000
                assert await keypad_verify(r) == KeypadResult(KeypadStatus.OK, 0x9000)
                assert (await keypad_verify(r)).status is KeypadStatus.CANCELLED
                assert await keypad_verify(r) == KeypadResult(KeypadStatus.CARD_STATUS, 0x63C2)
                proc.send_signal(signal.SIGUSR1)
                events: list[ReaderEvent] = []
                deadline = time.monotonic() + 5
                while not events and time.monotonic() < deadline:
                    events = await r.poll_events()
                assert [e.kind for e in events] == [ReaderEventKind.CARD_REMOVED]
                assert await code_of(r.run(select_ssse)) == "NO_CARD"
                proc.send_signal(signal.SIGUSR2)
                deadline = time.monotonic() + 5
                while not await r.present():
                    assert time.monotonic() < deadline
                assert (await r.run(select_ssse))[1] == 0x9000
                proc.kill()
                proc.wait(5)
                assert await code_of(r.run(select_ssse)) == "READER_GONE"
            finally:
                await r.close()

        asyncio.run(asyncio.wait_for(scenario(), 30))
    finally:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate(timeout=5)
    assert "Traceback" not in err
    assert GOOD not in err and "975319" not in err  # no keypad PIN in the log (-vv traces APDUs)
    assert "card removed" in err  # the log did run


def test_serve_serial_refuses_psam(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from firmware_sim.cli import main as emu_main

    image = tmp_path / "card.json"
    assert emu_main(["issue", "--out", str(image)]) == 0
    assert emu_main(["serve", "--card", str(image), "--serial", "--psam", str(image)]) == 2
    assert emu_main(["serve", "--card", str(image), "--keypad", "1234"]) == 2
    with pytest.raises(SystemExit):
        emu_main(["serve", "--card", str(image), "--serial", "--keypad", "12a4"])
    err = capsys.readouterr().err
    assert "12a4" not in err and "entry 1" in err
