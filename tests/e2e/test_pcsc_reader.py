"""The PC/SC reader and event monitor (:mod:`sscardd.readers.pcsc`) against real pcscd and vpcd.

The emulated card is served into slot 0 ("Virtual PCD 00 00") and the PSAM into slot 1; SIGUSR1 /
SIGUSR2 to ``sscard-emu serve`` pull and re-insert the card.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import pytest

from firmware_sim.lab import VPCD_READERS, Pcscd, wait_card_state
from sscardd.errors import SSCardError
from sscardd.readers.base import CardLink, ReaderEvent, ReaderEventKind
from sscardd.readers.pcsc import PcscMonitor, PcscReader, list_readers
from sscardd.transport import Exchanger
from tests.e2e.emulator import issue_card, issue_psam, serve, tail

pytestmark = pytest.mark.pcscd

CARD_READER, PSAM_READER = VPCD_READERS
SSSE_AID = bytes.fromhex("7378312E73682EC9E7BBE1B1A3D5CF")
SELECT_SSSE = bytes.fromhex("00A404000F") + SSSE_AID
SELECT_EF05 = bytes.fromhex("00A4020002EF05")
READ_CARD_NO = bytes.fromhex("00B207000B")
SELECT_PSAM_APP = bytes.fromhex("00A4040006D15600000590")
READ_TERMINAL_NO = bytes.fromhex("00B0960006")

OP_TIMEOUT = 10.0  # no single step here takes more than a fraction of this; a hang fails the test
EVENT_TIMEOUT = 10.0
ALL_ADDED_AND_INSERTED = [(k, r) for k in (ReaderEventKind.READER_ADDED, ReaderEventKind.CARD_INSERTED)
                          for r in VPCD_READERS]
T = TypeVar("T")


# -- fixtures and helpers ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A generation-3 card and a PSAM, issued once for the module."""
    d = tmp_path_factory.mktemp("pcsc-images")
    card, psam = d / "card.json", d / "psam.json"
    issue_card(card, "--generation", "3")
    issue_psam(psam)
    return card, psam


@contextlib.contextmanager
def _served(images: tuple[Path, Path], log: Path,
            extra: Sequence[str] = ()) -> Iterator[subprocess.Popen[bytes]]:
    """Card and PSAM served into pcscd; waits until pcscd sees them, and the slots empty after."""
    for reader in VPCD_READERS:
        assert wait_card_state(reader, present=False, timeout=5), f"{reader} holds a card already"
    card, psam = images
    with serve(card, psam=psam, extra=extra, log=log) as proc:
        for reader in VPCD_READERS:
            assert wait_card_state(reader, present=True, timeout=OP_TIMEOUT), (
                f"no card seen in {reader}; serve log:\n{tail(log)}")
        yield proc
    for reader in VPCD_READERS:
        assert wait_card_state(reader, present=False, timeout=OP_TIMEOUT), f"{reader} still holds a card"


class _Lab:
    """One ``sscard-emu serve`` shared by the module's tests (starting one costs pcscd's polls,
    about 0.8 s): restarted only when a test wants the other response mode or it died."""

    def __init__(self, images: tuple[Path, Path], log: Path) -> None:
        self.images = images
        self.log = log
        self.t0: bool | None = None
        self._stack: contextlib.ExitStack | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    def serve(self, *, t0: bool = False, card: bool = True) -> subprocess.Popen[bytes]:
        """The emulator in the wanted mode, with the card in (``card``) or pulled, PSAM in."""
        if self.proc is not None and (self.t0 != t0 or self.proc.poll() is not None):
            self.close()
        if self.proc is None:
            self._stack = contextlib.ExitStack()
            self.proc = self._stack.enter_context(
                _served(self.images, self.log, extra=["--t0"] if t0 else []))
            self.t0 = t0
        present = wait_card_state(CARD_READER, present=True, timeout=0)
        if card and not present:
            _insert(self.proc)
        elif not card and present:
            _pull(self.proc)
        return self.proc

    def close(self) -> None:
        stack, self._stack, self.proc = self._stack, None, None
        if stack is not None:
            stack.close()


@pytest.fixture(scope="module")
def lab(pcscd: Pcscd, images: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Lab]:
    lab = _Lab(images, tmp_path_factory.mktemp("pcsc-serve") / "serve.log")
    try:
        yield lab
    finally:
        lab.close()


@pytest.fixture
def served(lab: _Lab) -> subprocess.Popen[bytes]:
    """The shared emulator in normal (T=1-style) mode, card and PSAM in."""
    return lab.serve()


def _pull(proc: subprocess.Popen[bytes], wait: bool = True) -> None:
    proc.send_signal(signal.SIGUSR1)
    if wait:
        assert wait_card_state(CARD_READER, present=False, timeout=OP_TIMEOUT), "card not pulled"


def _insert(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGUSR2)
    assert wait_card_state(CARD_READER, present=True, timeout=OP_TIMEOUT), "card not re-inserted"


@contextlib.asynccontextmanager
async def _readers(*names: str) -> AsyncIterator[list[PcscReader]]:
    readers = [PcscReader(n) for n in names]
    try:
        yield readers
    finally:
        for r in readers:
            await asyncio.wait_for(r.close(), OP_TIMEOUT)


async def _run(reader: PcscReader, op: Callable[[CardLink], T], *, reset_after: bool = False) -> T:
    return await asyncio.wait_for(reader.run(op, reset_after=reset_after), OP_TIMEOUT)


async def _code(reader: PcscReader, op: Callable[[CardLink], object]) -> str:
    with pytest.raises(SSCardError) as ei:
        await _run(reader, op)
    return ei.value.code


def _select_ssse(link: CardLink) -> tuple[bytes, int]:
    resp = Exchanger(link).send(SELECT_SSSE)
    return resp.data, resp.sw


def _assert_fci(data: bytes, sw: int) -> None:
    assert sw == 0x9000
    assert data[0] == 0x6F and data[1] == len(data) - 2, data.hex()
    assert bytes((0x84, len(SSSE_AID))) + SSSE_AID in data


def _terminal_no(link: CardLink) -> bytes:
    return Exchanger(link, label="psam").send(READ_TERMINAL_NO).data


async def _expect(queue: asyncio.Queue[ReaderEvent], *expected: tuple[ReaderEventKind, str],
                  timeout: float = EVENT_TIMEOUT) -> list[ReaderEvent]:
    """Consume events until each of ``expected`` (kind, reader) has come, in any order across
    readers; returns everything consumed, so that the caller can check the order per reader."""
    missing = set(expected)
    got: list[ReaderEvent] = []
    deadline = time.monotonic() + timeout
    while missing:
        remaining = deadline - time.monotonic()
        try:
            ev = await asyncio.wait_for(queue.get(), max(remaining, 0.001))
        except TimeoutError:
            raise AssertionError(f"still waiting for {sorted((k.value, r) for k, r in missing)} after "
                                 f"{timeout} s; got {got}") from None
        got.append(ev)
        missing.discard((ev.kind, ev.reader))
    return got


def _kinds(events: list[ReaderEvent], reader: str) -> list[ReaderEventKind]:
    return [e.kind for e in events if e.reader == reader]


# -- reader -----------------------------------------------------------------------------------------


def test_list_readers(pcscd: Pcscd) -> None:
    assert set(VPCD_READERS) <= set(list_readers())


async def test_select_returns_fci_and_the_psam_answers(served: subprocess.Popen[bytes]) -> None:
    async with _readers(CARD_READER, PSAM_READER) as (card, psam):
        data, sw = await _run(card, _select_ssse)
        _assert_fci(data, sw)
        atr = await _run(card, lambda link: link.atr)
        assert atr[:1] == b"\x3b" and len(atr) > 4
        assert await _run(psam, _terminal_no) == bytes.fromhex("370212000001")
        assert await card.present() and await psam.present()


async def test_t0_mode_fci_through_get_response(lab: _Lab) -> None:
    lab.serve(t0=True)
    async with _readers(CARD_READER) as (card,):
        def op(link: CardLink) -> tuple[bytes, int, int, bytes]:
            ex = Exchanger(link)
            first = ex.raw(SELECT_SSSE)
            full = ex.send(SELECT_SSSE)
            return full.data, full.sw, ex.count, bytes((first.sw1,))

        data, sw, count, first_sw1 = await _run(card, op)
        assert first_sw1 == b"\x61"  # the card held its FCI back, as a T=0 card does
        assert count == 3  # the raw SELECT, then SELECT + GET RESPONSE
        _assert_fci(data, sw)


async def test_card_pulled_mid_operation(served: subprocess.Popen[bytes]) -> None:
    async with _readers(CARD_READER, PSAM_READER) as (card, psam):
        pulled_at: list[float] = []

        def op(link: CardLink) -> None:
            _assert_fci(*_select_ssse(link))
            _pull(served)  # pcscd has seen the card go: the next APDU gets "card removed"
            pulled_at.append(time.monotonic())
            _select_ssse(link)

        assert await _code(card, op) == "CARD_REMOVED"
        # The PSAM in slot 1 keeps working, and the empty slot says so.
        assert await _run(psam, _terminal_no) == bytes.fromhex("370212000001")
        assert not await card.present()
        assert await _code(card, _select_ssse) == "NO_CARD"

        _insert(served)
        _assert_fci(*await _run(card, _select_ssse))

        # Pulled without waiting for pcscd to notice: the APDU under way fails with
        # SCARD_E_NOT_TRANSACTED, and the reader waits for pcscd to tell removal from a mute card.
        def op_fast(link: CardLink) -> None:
            _select_ssse(link)
            _pull(served, wait=False)
            time.sleep(0.05)  # the emulator closes its vpcd socket
            _select_ssse(link)

        t0 = time.monotonic()
        assert await _code(card, op_fast) == "CARD_REMOVED"
        assert time.monotonic() - t0 < 2.0
        _insert(served)
        _assert_fci(*await _run(card, _select_ssse))


async def test_empty_reader_is_no_card(lab: _Lab) -> None:
    lab.serve(card=False)
    async with _readers(CARD_READER, PSAM_READER) as (card, psam):
        assert await _code(card, _select_ssse) == "NO_CARD"
        assert not await card.present()
        assert await _run(psam, _terminal_no) == bytes.fromhex("370212000001")


async def test_unknown_reader_is_reader_gone(pcscd: Pcscd) -> None:
    async with _readers("No Such Reader 00 00") as (r,):
        assert await _code(r, _select_ssse) == "READER_GONE"
        assert not await r.present()


async def test_keypad_is_unsupported(served: subprocess.Popen[bytes]) -> None:
    async with _readers(CARD_READER) as (card,):
        assert not card.has_keypad
        assert await _code(card, lambda link: link.keypad_verify(1.0)) == "UNSUPPORTED"


async def test_handle_reuse_and_resets(served: subprocess.Popen[bytes]) -> None:
    def select_ef05(link: CardLink) -> None:
        _select_ssse(link)
        assert Exchanger(link).send(SELECT_EF05).sw == 0x9000

    def read_card_no(link: CardLink) -> int:
        return Exchanger(link).send(READ_CARD_NO).sw

    async with _readers(CARD_READER, CARD_READER) as (r1, r2):
        await _run(r1, select_ef05)
        # Without a reset the card keeps its state between operations (one connection).
        assert await _run(r1, read_card_no) == 0x9000
        # reset_after: the next operation finds a freshly reset card (no current EF).
        await _run(r1, select_ef05, reset_after=True)
        assert await _run(r1, read_card_no) == 0x6986

        # The link's reset inside an operation: same ATR, state cleared, operation goes on.
        def reset_in_op(link: CardLink) -> tuple[bytes, bytes, int]:
            select_ef05(link)
            return link.atr, link.reset(), read_card_no(link)

        before, after, sw = await _run(r1, reset_in_op)
        assert before == after and sw == 0x6986

        # Another application resets the card between our operations: ours reconnects quietly.
        await _run(r1, select_ef05)
        await _run(r2, _select_ssse, reset_after=True)
        assert await _run(r1, read_card_no) == 0x6986
        _assert_fci(*await _run(r1, _select_ssse))


async def test_two_readers_on_one_slot_do_not_interleave(served: subprocess.Popen[bytes]) -> None:
    stamps: list[tuple[str, float]] = []
    first_apdu_sent = threading.Event()

    def op1(link: CardLink) -> None:
        stamps.append(("op1 start", time.monotonic()))
        _select_ssse(link)
        first_apdu_sent.set()
        time.sleep(0.3)
        link.reset()  # the transaction survives a reset inside it
        _select_ssse(link)
        stamps.append(("op1 end", time.monotonic()))

    def op2(link: CardLink) -> None:
        stamps.append(("op2 start", time.monotonic()))
        _select_ssse(link)
        stamps.append(("op2 end", time.monotonic()))

    async with _readers(CARD_READER, CARD_READER) as (r1, r2):
        await _run(r2, _select_ssse)  # r2 holds a connection already: only the transaction blocks it
        t1 = asyncio.create_task(_run(r1, op1))
        assert await asyncio.to_thread(first_apdu_sent.wait, OP_TIMEOUT)
        t2 = asyncio.create_task(_run(r2, op2))
        await asyncio.gather(t1, t2)
        # A third reader that connects afresh waits too (in pcscd's SCardConnect).
        async with _readers(CARD_READER) as (r3,):
            first_apdu_sent.clear()
            t1 = asyncio.create_task(_run(r1, op1))
            assert await asyncio.to_thread(first_apdu_sent.wait, OP_TIMEOUT)
            t3 = asyncio.create_task(_run(r3, op2))
            await asyncio.gather(t1, t3)
    names = [name for name, _ in stamps]
    assert names == ["op1 start", "op1 end", "op2 start", "op2 end"] * 2, stamps
    # op2 was started while op1 was sleeping, and only got the card once op1 had ended.
    assert stamps[2][1] - stamps[0][1] >= 0.3


# -- monitor ----------------------------------------------------------------------------------------


async def test_monitor_reports_card_removal_and_insertion(served: subprocess.Popen[bytes]) -> None:
    monitor = PcscMonitor()
    queue: asyncio.Queue[ReaderEvent] = asyncio.Queue()
    monitor.start(asyncio.get_running_loop(), queue.put_nowait)
    try:
        first = await _expect(queue, *ALL_ADDED_AND_INSERTED)
        assert len(first) == 4
        for r in VPCD_READERS:
            assert _kinds(first, r) == [ReaderEventKind.READER_ADDED, ReaderEventKind.CARD_INSERTED]
        atr = monitor.snapshot()[CARD_READER]
        assert atr and atr[:1] == b"\x3b"

        _pull(served, wait=False)
        got = await _expect(queue, (ReaderEventKind.CARD_REMOVED, CARD_READER))
        assert got == [ReaderEvent(ReaderEventKind.CARD_REMOVED, CARD_READER)]
        assert monitor.snapshot()[CARD_READER] is None

        _insert(served)
        got = await _expect(queue, (ReaderEventKind.CARD_INSERTED, CARD_READER))
        assert got == [ReaderEvent(ReaderEventKind.CARD_INSERTED, CARD_READER, atr)]
        await asyncio.sleep(0.1)
        assert queue.empty()  # nothing happened to the PSAM slot
    finally:
        monitor.stop()
    assert not monitor.service_up


async def test_monitor_events_iterator_and_quick_stop(served: subprocess.Popen[bytes]) -> None:
    monitor = PcscMonitor(poll_timeout=30.0)  # stop() must not wait for the poll timeout
    got: list[ReaderEvent] = []
    async with contextlib.aclosing(monitor.events()) as events:
        async for ev in events:
            got.append(ev)
            if len(got) == 4:
                break
    t0 = time.monotonic()
    monitor.stop()  # idempotent; the aclosing above stopped it already
    assert time.monotonic() - t0 < 0.5
    assert {e.kind for e in got} == {ReaderEventKind.READER_ADDED, ReaderEventKind.CARD_INSERTED}

    monitor = PcscMonitor(poll_timeout=30.0)
    monitor.start_thread(lambda ev: None)
    await asyncio.sleep(0.2)  # the thread is blocked in SCardGetStatusChange by now
    t0 = time.monotonic()
    monitor.stop()
    assert time.monotonic() - t0 < 0.5


async def test_pcscd_killed_and_restarted(own_pcscd: Pcscd, lab: _Lab) -> None:
    monitor = PcscMonitor(retry_max=0.5)
    queue: asyncio.Queue[ReaderEvent] = asyncio.Queue()
    proc = lab.serve()
    async with _readers(CARD_READER, PSAM_READER) as (card, psam):
        _assert_fci(*await _run(card, _select_ssse))
        # The PSAM reader keeps its context and handle from before the kill, unused until after.
        assert await _run(psam, _terminal_no) == bytes.fromhex("370212000001")
        monitor.start(asyncio.get_running_loop(), queue.put_nowait)
        try:
            await _expect(queue, *[(ReaderEventKind.CARD_INSERTED, r) for r in VPCD_READERS])

            assert own_pcscd.proc is not None
            os.kill(own_pcscd.proc.pid, signal.SIGKILL)
            got = await _expect(queue, *[(ReaderEventKind.READER_REMOVED, r) for r in VPCD_READERS])
            for r in VPCD_READERS:
                assert _kinds(got, r) == [ReaderEventKind.CARD_REMOVED, ReaderEventKind.READER_REMOVED]
            assert await _code(card, _select_ssse) == "READER_GONE"
            assert not await card.present()

            own_pcscd.stop()  # reaps it, removes the pid file and socket it left
            # From this thread, not a worker: lab's helpers die with the *thread* that started
            # them (PR_SET_PDEATHSIG), and the loop's worker threads end with the test.
            own_pcscd.start()
            # The emulator reconnects to vpcd by itself (with its own backoff).
            got = await _expect(queue, *ALL_ADDED_AND_INSERTED)
            for r in VPCD_READERS:
                assert _kinds(got, r) == [ReaderEventKind.READER_ADDED, ReaderEventKind.CARD_INSERTED]
            assert monitor.service_up
            _assert_fci(*await _run(card, _select_ssse))
            assert await card.present()
            # A context from before the restart is replaced without a fuss (no READER_GONE).
            assert await _run(psam, _terminal_no) == bytes.fromhex("370212000001")
        finally:
            monitor.stop()
    assert proc.poll() is None, f"serve died:\n{tail(lab.log)}"
