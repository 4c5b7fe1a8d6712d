"""The PC/SC transport: readers of the system's pcscd, through pyscard's low-level ``smartcard.scard``.

* :class:`PcscReader` — one PC/SC reader. Every PC/SC call for it runs in its worker thread
  (pyscard releases the GIL in each call), with a SCARDCONTEXT of its own. An operation connects
  in shared mode (or re-uses the handle of the previous one), holds a PC/SC transaction for its
  whole length, and ends it leaving or resetting the card.
* :class:`PcscMonitor` — reader and card events from one ``SCardGetStatusChange`` loop over all
  readers and the PnP pseudo-reader, in a thread of its own; it lives through pcscd restarts.
* :func:`list_readers` — the reader names pcscd knows.

pyscard is the optional extra ``pcsc``: it is imported on first use, and its absence is a
READER_UNAVAILABLE error, not an import error of this module.

What pcsc-lite 1.9.9 does (measured with vpcd on Debian 12), and what follows from it:

* A transaction blocks everyone else on that reader, not only other transactions: another
  handle's ``SCardConnect`` waits in pcscd, and its ``SCardTransmit``/``SCardStatus``/
  ``SCardBeginTransaction`` retry every 100 ms in the client library — without a time limit.
  So operations are exclusive, and a foreign application that holds a transaction for ever
  stalls this reader's worker thread for as long.
* Ending a transaction with ``SCARD_RESET_CARD`` leaves *every* handle, ours included, answering
  ``SCARD_W_RESET_CARD`` until it reconnects; a removed card leaves ``SCARD_W_REMOVED_CARD`` in the
  same way, even after a new card is in. The next operation therefore reconnects
  (``SCardReconnect`` with ``SCARD_LEAVE_CARD``) before it starts: operations share no card state.
* A card pulled while an APDU is under way first gives ``SCARD_E_NOT_TRANSACTED``; pcscd notices
  the removal only at its next presence poll (400 ms for vpcd). Such errors wait a moment for
  pcscd to decide whether the card is still there.
* A killed pcscd fails a blocked ``SCardGetStatusChange`` with ``SCARD_F_COMM_ERROR``; every later
  call on the old context says ``SCARD_E_NO_SERVICE`` (even once pcscd is back), while
  ``SCardIsValidContext`` still says the context is fine. Contexts are re-established.
* pcsc-lite keeps a card event counter in the high 16 bits of a reader's event state (and of
  ``SCardStatus``'s state); it counts insertions and removals, not resets. A card swapped between
  two looks is told apart from the same card by it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any

import structlog

from sscardd.errors import SSCardError
from sscardd.readers.base import (
    CardLink,
    CardRemovedError,
    EventCallback,
    KeypadResult,
    KeypadUnsupported,
    LinkError,
    NoCardError,
    Reader,
    ReaderEvent,
    ReaderEventKind,
    ReaderGoneError,
)

__all__ = ["PNP_NOTIFICATION", "PcscMonitor", "PcscReader", "error_text", "list_readers", "scard"]

log = structlog.get_logger(__name__)

PNP_NOTIFICATION = "\\\\?PnP?\\Notification"  # the pseudo-reader whose state changes with the reader list
_COUNTER_SHIFT = 16  # pcsc-lite: card event counter in the high word of a reader's event state


def scard() -> Any:
    """pyscard's low-level module ``smartcard.scard``, imported on first use."""
    try:
        from smartcard import scard as module
    except ImportError as exc:
        raise SSCardError(
            "READER_UNAVAILABLE",
            f"pyscard is not installed ({exc}); install the extra: pip install 'sscardd[pcsc]'",
        ) from None
    return module


def error_text(hresult: int) -> str:
    """A PC/SC result as text with its code, e.g. ``Card was removed. (0x80100069)``."""
    return f"{scard().SCardGetErrorMessage(hresult)} ({hresult & 0xFFFFFFFF:#010x})"


class _Codes:
    """PC/SC result codes grouped by what they mean here."""

    def __init__(self, sc: Any) -> None:
        # The connection to pcscd is broken: a new context is needed (pcscd may be back already).
        # A pcscd that dies while a client connects can make the client library report "access
        # denied" (it reads a closed socket as a polkit refusal); retrying is right for both.
        self.service_lost = frozenset({
            sc.SCARD_E_NO_SERVICE, sc.SCARD_E_SERVICE_STOPPED, sc.SCARD_F_COMM_ERROR,
            sc.SCARD_E_INVALID_HANDLE, sc.SCARD_W_SECURITY_VIOLATION,
        })
        self.reader_gone = self.service_lost | {sc.SCARD_E_UNKNOWN_READER, sc.SCARD_E_READER_UNAVAILABLE}
        # The card we were talking to is not the one in the reader any more (or none is).
        self.card_gone = frozenset({sc.SCARD_W_REMOVED_CARD, sc.SCARD_E_NO_SMARTCARD, sc.SCARD_W_RESET_CARD})
        # Transmission failures that a card pulled mid-APDU produces before pcscd notices.
        self.maybe_removed = frozenset({
            sc.SCARD_E_NOT_TRANSACTED, sc.SCARD_W_UNRESPONSIVE_CARD, sc.SCARD_W_UNPOWERED_CARD,
            sc.SCARD_F_UNKNOWN_ERROR,
        })


def list_readers() -> list[str]:
    """The names of pcscd's readers (``[]`` if it has none); READER_UNAVAILABLE without pcscd.

    Blocking (a few local IPC round trips): from async code, run it in a thread.
    """
    sc = scard()
    rv, ctx = sc.SCardEstablishContext(sc.SCARD_SCOPE_USER)
    if rv != sc.SCARD_S_SUCCESS:
        raise SSCardError("READER_UNAVAILABLE", f"pcscd does not answer: {error_text(rv)}")
    try:
        rv, readers = sc.SCardListReaders(ctx, [])
    finally:
        sc.SCardReleaseContext(ctx)
    if rv == sc.SCARD_E_NO_READERS_AVAILABLE:
        return []
    if rv != sc.SCARD_S_SUCCESS:
        raise SSCardError("READER_UNAVAILABLE", f"SCardListReaders: {error_text(rv)}")
    return [str(r) for r in readers]


# -- one reader -----------------------------------------------------------------------------------


class _PcscLink:
    """The card during one operation (worker thread only); valid until the operation ends."""

    def __init__(self, reader: PcscReader) -> None:
        self._reader = reader
        self.closed = False

    @property
    def atr(self) -> bytes:
        return self._reader._atr

    def transmit(self, apdu: bytes) -> bytes:
        if self.closed:
            raise LinkError("the operation is over; this link is closed")
        return self._reader._transmit(apdu)

    def reset(self) -> bytes:
        if self.closed:
            raise LinkError("the operation is over; this link is closed")
        return self._reader._reset_card()

    def keypad_verify(self, timeout: float) -> KeypadResult:
        raise KeypadUnsupported("PC/SC PIN-pad readers are not supported")

    def keypad_change(self, timeout: float) -> KeypadResult:
        raise KeypadUnsupported("PC/SC PIN-pad readers are not supported")


class PcscReader(Reader):
    """One PC/SC reader by name (as :func:`list_readers` gives it).

    ``removal_grace``: how long a failed transmission waits for pcscd to say whether the card
    is still there (a pulled card then fails the operation with CARD_REMOVED rather than
    CARD_NO_ANSWER).
    """

    kind = "pcsc"
    has_keypad = False  # PC/SC PIN pads (FEATURE_VERIFY_PIN_DIRECT) are out of scope

    def __init__(self, name: str, *, removal_grace: float = 1.0) -> None:
        self._sc = scard()
        self._rc = _Codes(self._sc)
        super().__init__(name)
        self.removal_grace = removal_grace
        # Worker-thread state: touched by no other thread.
        self._ctx: Any = None
        self._hcard: Any = None
        self._protocol = 0
        self._atr = b""
        self._events = 0  # pcscd's card event counter when we (re)connected
        self._link: _PcscLink | None = None

    # -- Reader hooks (worker thread) ---------------------------------------------------------

    def _open_link(self) -> CardLink:
        if self._link is not None:
            self._link.closed = True
            self._link = None
        reused = self._ctx is not None
        try:
            link = self._open_once()
        except ReaderGoneError:
            if not reused:
                raise
            # A context from before a pcscd restart fails on first use; pcscd may be back already.
            link = self._open_once()
        self._link = link
        return link

    def _close_link(self, link: CardLink, reset: bool) -> None:
        if isinstance(link, _PcscLink):
            link.closed = True
        self._link = None
        if self._hcard is None:
            return
        sc = self._sc
        rv = sc.SCardEndTransaction(self._hcard, sc.SCARD_RESET_CARD if reset else sc.SCARD_LEAVE_CARD)
        if rv != sc.SCARD_S_SUCCESS:
            log.debug("pcsc end transaction failed", reader=self.name, error=error_text(rv))
            # A handle whose transaction cannot be ended must not keep the reader locked.
            if rv in self._rc.service_lost:
                self._drop_context()
            else:
                # the reset that was asked for must still happen (a verified PIN must not carry
                # over): disconnecting with RESET does it
                self._drop_handle(reset=reset)
        elif reset:
            # pcsc-lite makes a reset sticky on every handle, ours included ("card was reset"
            # until a reconnect); start the next operation on a fresh connection.
            self._drop_handle()

    def _card_present(self) -> bool:
        for attempt in range(2):
            try:
                ctx = self._context()
            except ReaderGoneError:
                return False
            sc = self._sc
            rv, states = sc.SCardGetStatusChange(ctx, 0, [(self.name, sc.SCARD_STATE_UNAWARE)])
            if rv == sc.SCARD_S_SUCCESS:
                return bool(states[0][1] & sc.SCARD_STATE_PRESENT)
            if rv not in self._rc.service_lost or attempt:
                return False
            self._drop_context()  # stale context from before a pcscd restart: once more, fresh
        return False

    def _shutdown(self) -> None:
        self._drop_context()

    # -- connection management (worker thread) ------------------------------------------------

    def _context(self) -> Any:
        if self._ctx is None:
            sc = self._sc
            rv, ctx = sc.SCardEstablishContext(sc.SCARD_SCOPE_USER)
            if rv != sc.SCARD_S_SUCCESS:
                raise ReaderGoneError(f"pcscd does not answer: {error_text(rv)}")
            self._ctx = ctx
        return self._ctx

    def _open_once(self) -> _PcscLink:
        sc = self._sc
        ctx = self._context()
        if self._hcard is None:
            self._connect(ctx)
        # A few rounds: another application may reset the card between our reconnect and begin.
        for _ in range(3):
            rv = sc.SCardBeginTransaction(self._hcard)
            if rv == sc.SCARD_S_SUCCESS:
                return _PcscLink(self)
            if rv in (sc.SCARD_W_RESET_CARD, sc.SCARD_W_REMOVED_CARD):
                # Reset or replaced since the last operation (by us or another application); an
                # operation starts from scratch anyway, so take the card as it is now.
                self._reconnect(sc.SCARD_LEAVE_CARD, during_op=False)
                continue
            raise self._error(rv, "SCardBeginTransaction", during_op=False)
        self._drop_handle()
        raise LinkError("the card keeps being reset by another application")

    def _connect(self, ctx: Any) -> None:
        sc = self._sc
        rv, hcard, protocol = sc.SCardConnect(
            ctx, self.name, sc.SCARD_SHARE_SHARED, sc.SCARD_PROTOCOL_T0 | sc.SCARD_PROTOCOL_T1)
        if rv != sc.SCARD_S_SUCCESS:
            raise self._error(rv, "SCardConnect", during_op=False)
        self._hcard, self._protocol = hcard, protocol
        self._read_status(during_op=False)

    def _reconnect(self, initialization: int, *, during_op: bool) -> None:
        sc = self._sc
        rv, protocol = sc.SCardReconnect(
            self._hcard, sc.SCARD_SHARE_SHARED, sc.SCARD_PROTOCOL_T0 | sc.SCARD_PROTOCOL_T1, initialization)
        if rv != sc.SCARD_S_SUCCESS:
            raise self._error(rv, "SCardReconnect", during_op=during_op)
        self._protocol = protocol
        self._read_status(during_op=during_op)

    def _read_status(self, *, during_op: bool) -> None:
        sc = self._sc
        rv, _reader, state, _protocol, atr = sc.SCardStatus(self._hcard)
        if rv != sc.SCARD_S_SUCCESS:
            raise self._error(rv, "SCardStatus", during_op=during_op)
        self._atr = bytes(atr)
        self._events = (state >> _COUNTER_SHIFT) & 0xFFFF

    def _error(self, rv: int, what: str, *, during_op: bool) -> LinkError:
        """The link error for a failed call; drops the handle or the context as needed."""
        text = f"{what}({self.name!r}): {error_text(rv)}"
        if rv in self._rc.reader_gone:
            self._drop_context()
            return ReaderGoneError(text)
        if rv in self._rc.card_gone:
            # Removed, or reset by someone else: either way the card's security state is gone.
            self._drop_handle()
            return CardRemovedError(text) if during_op else NoCardError(text)
        return LinkError(text)

    def _drop_handle(self, reset: bool = False) -> None:
        if self._hcard is not None:
            disposition = self._sc.SCARD_RESET_CARD if reset else self._sc.SCARD_LEAVE_CARD
            with contextlib.suppress(Exception):
                self._sc.SCardDisconnect(self._hcard, disposition)
            self._hcard = None
            self._atr = b""

    def _drop_context(self) -> None:
        self._drop_handle()
        if self._ctx is not None:
            with contextlib.suppress(Exception):
                self._sc.SCardReleaseContext(self._ctx)
            self._ctx = None

    # -- the link's work (worker thread) ------------------------------------------------------

    def _transmit(self, apdu: bytes) -> bytes:
        if self._hcard is None:
            raise CardRemovedError("no connection to the card any more (removed, or pcscd went away)")
        sc = self._sc
        pci = {sc.SCARD_PROTOCOL_T0: sc.SCARD_PCI_T0, sc.SCARD_PROTOCOL_T1: sc.SCARD_PCI_T1,
               sc.SCARD_PROTOCOL_RAW: sc.SCARD_PCI_RAW}.get(self._protocol, self._protocol)
        rv, response = sc.SCardTransmit(self._hcard, pci, list(apdu))
        if rv == sc.SCARD_S_SUCCESS:
            return bytes(response)
        if rv in self._rc.maybe_removed and self._card_went_away():
            self._drop_handle()
            raise CardRemovedError(f"SCardTransmit({self.name!r}): {error_text(rv)}; the card is gone")
        raise self._error(rv, "SCardTransmit", during_op=True)

    def _reset_card(self) -> bytes:
        if self._hcard is None:
            raise CardRemovedError("no connection to the card any more (removed, or pcscd went away)")
        # Inside the transaction: pcscd keeps it across the reconnect (measured), so the reset
        # card stays ours.
        self._reconnect(self._sc.SCARD_RESET_CARD, during_op=True)
        return self._atr

    def _card_went_away(self) -> bool:
        """After a failed transmission: wait up to ``removal_grace`` for pcscd to see the card go."""
        sc = self._sc
        deadline = time.monotonic() + self.removal_grace
        state = sc.SCARD_STATE_UNAWARE
        while True:
            remaining = deadline - time.monotonic()
            timeout_ms = max(0, int(remaining * 1000))
            rv, states = sc.SCardGetStatusChange(self._ctx, timeout_ms, [(self.name, state)])
            if rv != sc.SCARD_S_SUCCESS:
                return False  # timeout (the card stays), or a failure the caller reports anyway
            event = states[0][1]
            counter = (event >> _COUNTER_SHIFT) & 0xFFFF
            if not event & sc.SCARD_STATE_PRESENT or (self._events and counter != self._events):
                return True
            if remaining <= 0:
                return False
            state = event & ~sc.SCARD_STATE_CHANGED


# -- events ---------------------------------------------------------------------------------------


class PcscMonitor:
    """Reader and card events of pcscd, from a ``SCardGetStatusChange`` loop in its own thread.

    Events: READER_ADDED and READER_REMOVED (the PnP pseudo-reader wakes the loop when the
    reader list changes), CARD_INSERTED (with the ATR; empty for a mute card) and CARD_REMOVED.
    On start, every reader is reported added and every card inserted. A card that is removed
    from a reader, or whose reader goes, is reported removed before its reader.

    pcscd going away (killed, restarted) ends the context: all readers are reported removed at
    once, the context is re-established with a capped backoff (quietly while pcscd stays down),
    and the readers of the new pcscd are reported added. ``poll_timeout`` bounds each
    ``SCardGetStatusChange`` as a safety net for changes that slip between two calls.
    """

    def __init__(self, *, poll_timeout: float = 1.0, retry_min: float = 0.1, retry_max: float = 2.0) -> None:
        self.poll_timeout = poll_timeout
        self.retry_min = retry_min
        self.retry_max = retry_max
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._ctx_lock = threading.Lock()  # the context, as SCardCancel in stop() sees it
        self._ctx: Any = None
        self._callback: EventCallback | None = None
        self._on_stop: Callable[[], None] | None = None
        self._state_lock = threading.Lock()
        self._cards: dict[str, bytes | None] = {}
        self._service_up = False

    # -- public -------------------------------------------------------------------------------

    @property
    def service_up(self) -> bool:
        """Whether the monitor currently has a working context with pcscd."""
        return self._service_up

    def snapshot(self) -> dict[str, bytes | None]:
        """The readers as last seen: name → ATR of the card in it, or ``None`` when empty."""
        with self._state_lock:
            return dict(self._cards)

    def start_thread(self, callback: EventCallback) -> None:
        """Start the monitor thread; ``callback`` runs in that thread (keep it short)."""
        if self._thread is not None:
            raise RuntimeError("the monitor is running already")
        self._sc = scard()
        self._rc = _Codes(self._sc)
        self._callback = callback
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="pcsc-monitor", daemon=True)
        self._thread.start()

    def start(self, loop: asyncio.AbstractEventLoop, callback: EventCallback) -> None:
        """Start the monitor; ``callback`` runs in ``loop`` (``call_soon_threadsafe``)."""

        def deliver(event: ReaderEvent) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens any more
                loop.call_soon_threadsafe(callback, event)

        self.start_thread(deliver)

    async def events(self) -> AsyncGenerator[ReaderEvent, None]:
        """Start the monitor and yield its events until :meth:`stop` (which closing this does).

        Use it with ``contextlib.aclosing`` so that leaving the loop stops the monitor at once.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[ReaderEvent | None] = asyncio.Queue()
        self.start(loop, queue.put_nowait)

        def end() -> None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(queue.put_nowait, None)

        self._on_stop = end
        try:
            while (event := await queue.get()) is not None:
                yield event
        finally:
            self.stop()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread: ``SCardCancel`` wakes a blocked ``SCardGetStatusChange`` at once."""
        self._stopping.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            deadline = time.monotonic() + timeout
            # Cancel only cuts a call in progress: repeat it, in case the thread was between calls.
            while thread.is_alive() and time.monotonic() < deadline:
                with self._ctx_lock:
                    if self._ctx is not None:
                        self._sc.SCardCancel(self._ctx)
                thread.join(0.05)
            if thread.is_alive():
                log.warning("pcsc monitor thread did not stop", timeout=timeout)
        on_stop, self._on_stop = self._on_stop, None
        if on_stop is not None:
            on_stop()

    # -- the thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        sc = self._sc
        known: dict[str, int] = {}  # reader → event state last seen (CHANGED bit cleared)
        pnp_state = sc.SCARD_STATE_UNAWARE
        backoff = self.retry_min
        ctx: Any = None
        down_since: float | None = None
        try:
            while not self._stopping.is_set():
                if ctx is None:
                    rv, new_ctx = sc.SCardEstablishContext(sc.SCARD_SCOPE_USER)
                    if rv != sc.SCARD_S_SUCCESS:
                        if down_since is None:
                            down_since = time.monotonic()
                            log.warning("pcscd not reachable; retrying", error=error_text(rv))
                        self._stopping.wait(backoff)
                        backoff = min(backoff * 2, self.retry_max)
                        continue
                    with self._ctx_lock:
                        self._ctx = ctx = new_ctx
                    if down_since is not None:
                        log.info("pcscd reachable again", after=round(time.monotonic() - down_since, 2))
                        down_since = None
                    self._service_up = True
                    pnp_state = sc.SCARD_STATE_UNAWARE
                    backoff = self.retry_min
                    continue  # re-check the stop flag: stop() may have missed the new context

                rv, readers = sc.SCardListReaders(ctx, [])
                if rv == sc.SCARD_E_NO_READERS_AVAILABLE:
                    readers = []
                elif rv != sc.SCARD_S_SUCCESS:
                    if rv in self._rc.service_lost:
                        self._lose_context(ctx, known, rv)
                        ctx, down_since = None, time.monotonic()
                    else:
                        log.warning("SCardListReaders failed", error=error_text(rv))
                        self._stopping.wait(self.poll_timeout)
                    continue
                names = [str(r) for r in readers]
                for name in [n for n in known if n not in names]:
                    self._reader_removed(name, known.pop(name))
                for name in names:
                    if name not in known:
                        known[name] = sc.SCARD_STATE_UNAWARE
                        self._emit(ReaderEvent(ReaderEventKind.READER_ADDED, name))

                states = [(n, known[n]) for n in names] + [(PNP_NOTIFICATION, pnp_state)]
                rv, out = sc.SCardGetStatusChange(ctx, int(self.poll_timeout * 1000), states)
                if rv in (sc.SCARD_E_TIMEOUT, sc.SCARD_E_CANCELLED):
                    continue
                if rv in self._rc.service_lost:
                    self._lose_context(ctx, known, rv)
                    ctx, down_since = None, time.monotonic()
                    continue
                if rv != sc.SCARD_S_SUCCESS:
                    # E.g. SCARD_E_UNKNOWN_READER: a reader went between the listing and this
                    # call (the whole call fails then). List again, without spinning.
                    log.debug("SCardGetStatusChange failed", error=error_text(rv))
                    self._stopping.wait(0.05)
                    continue
                changed = False
                for name, event, atr in out:
                    new = event & ~sc.SCARD_STATE_CHANGED
                    if name == PNP_NOTIFICATION:
                        changed |= bool(event & sc.SCARD_STATE_CHANGED)
                        pnp_state = new
                        continue
                    prev = known.get(name)
                    if prev is None:
                        continue
                    if new != prev:
                        changed = True
                        self._card_transition(name, prev, new, bytes(atr))
                        known[name] = new
                if not changed:
                    self._stopping.wait(0.05)  # nothing new although the call returned: no busy loop
        except Exception:  # pragma: no cover - a bug; say so rather than die silently
            log.exception("pcsc monitor thread failed")
            raise
        finally:
            with self._ctx_lock:
                self._ctx = None
            if ctx is not None:
                with contextlib.suppress(Exception):
                    sc.SCardReleaseContext(ctx)
            self._service_up = False

    def _lose_context(self, ctx: Any, known: dict[str, int], rv: int) -> None:
        """pcscd went away: the context is dead for good, and so are its readers."""
        log.warning("pcscd connection lost", error=error_text(rv))
        with self._ctx_lock:
            self._ctx = None
        with contextlib.suppress(Exception):
            self._sc.SCardReleaseContext(ctx)
        self._service_up = False
        for name in list(known):
            self._reader_removed(name, known.pop(name))

    def _reader_removed(self, name: str, last_state: int) -> None:
        if last_state & self._sc.SCARD_STATE_PRESENT:
            self._emit(ReaderEvent(ReaderEventKind.CARD_REMOVED, name))
        self._emit(ReaderEvent(ReaderEventKind.READER_REMOVED, name))

    def _card_transition(self, name: str, prev: int, new: int, atr: bytes) -> None:
        sc = self._sc
        was = bool(prev & sc.SCARD_STATE_PRESENT)
        now = bool(new & sc.SCARD_STATE_PRESENT)
        # Present before and after, yet the event counter moved: a different card (or the same
        # one pulled and put back) between two looks.
        swapped = was and now and (prev >> _COUNTER_SHIFT) != (new >> _COUNTER_SHIFT)
        if was and (not now or swapped):
            self._emit(ReaderEvent(ReaderEventKind.CARD_REMOVED, name))
        if now and (not was or swapped):
            self._emit(ReaderEvent(ReaderEventKind.CARD_INSERTED, name, atr))

    def _emit(self, event: ReaderEvent) -> None:
        with self._state_lock:
            if event.kind is ReaderEventKind.READER_REMOVED:
                self._cards.pop(event.reader, None)
            elif event.kind is ReaderEventKind.CARD_INSERTED:
                self._cards[event.reader] = event.atr
            else:
                self._cards[event.reader] = None
        log.debug("pcsc event", kind=event.kind.value, reader=event.reader, atr=event.atr.hex().upper())
        callback = self._callback
        if callback is None:
            return
        try:
            callback(event)
        except Exception:
            log.exception("pcsc event callback failed", kind=event.kind.value, reader=event.reader)
