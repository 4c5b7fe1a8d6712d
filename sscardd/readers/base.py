"""The reader interface every transport implements (PC/SC, serial keypad reader, emulated).

Two levels:

* :class:`CardLink` — synchronous access to one powered card for the length of one operation.
  It runs in the reader's own worker thread, so a multi-APDU read costs one hand-over to the
  event loop, not one per APDU. Links raise :class:`LinkError` subclasses; nothing else.
* :class:`Reader` — the async face the card session uses: ``await reader.run(op)`` connects (or
  re-uses) the card exclusively, runs ``op(link)`` in the worker thread, and maps link failures
  to named :class:`~sscardd.errors.SSCardError`\\ s (NO_CARD, CARD_REMOVED, READER_GONE, ...).

Keypad readers also offer :meth:`CardLink.keypad_verify` / :meth:`CardLink.keypad_change`: the
reader collects the PIN on its own keypad and builds the VERIFY / CHANGE PIN itself, so the PIN
never reaches the host.
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import contextlib
import enum
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from apdu_specs.serial_frame import KeypadStatus
from sscardd.errors import SSCardError

T = TypeVar("T")

__all__ = [
    "CardLink", "CardRemovedError", "KeypadResult", "KeypadStatus", "KeypadUnsupported", "LinkError",
    "NoCardError", "Reader", "ReaderChecksumError", "ReaderEvent", "ReaderEventKind", "ReaderGoneError",
    "map_link_error",
]


class LinkError(Exception):
    """A transport-level failure (base)."""


class NoCardError(LinkError):
    """No card in the reader."""


class CardRemovedError(LinkError):
    """The card went away (or was reset by someone else) during the operation."""


class ReaderGoneError(LinkError):
    """The reader itself is gone (unplugged, pcscd down, serial line closed)."""


class KeypadUnsupported(LinkError):
    """This reader has no keypad."""


class ReaderChecksumError(LinkError):
    """The line to the reader garbles frames (a reply failed its checksum, or the reader kept
    refusing ours); the command may or may not have run."""


@dataclass(frozen=True)
class KeypadResult:
    status: KeypadStatus
    sw: int = 0x9000


class CardLink(Protocol):
    """Synchronous access to the powered card during one operation (worker thread only)."""

    @property
    def atr(self) -> bytes: ...

    def transmit(self, apdu: bytes) -> bytes:
        """Send one C-APDU, return the raw R-APDU (data ‖ SW1 SW2). Raises LinkError."""
        ...

    def reset(self) -> bytes:
        """Warm-reset the card (security state cleared); returns the ATR."""
        ...

    def keypad_verify(self, timeout: float) -> KeypadResult:
        """Collect a PIN on the reader's keypad and VERIFY it (KeypadUnsupported if none)."""
        ...

    def keypad_change(self, timeout: float) -> KeypadResult:
        """Collect old, new and new-again PINs on the keypad and CHANGE PIN."""
        ...


class ReaderEventKind(enum.Enum):
    READER_ADDED = "reader_added"
    READER_REMOVED = "reader_removed"
    CARD_INSERTED = "card_inserted"
    CARD_REMOVED = "card_removed"


@dataclass(frozen=True)
class ReaderEvent:
    kind: ReaderEventKind
    reader: str
    atr: bytes = b""


EventCallback = Callable[[ReaderEvent], None]


class Reader(abc.ABC):
    """One reader slot. Subclasses provide :meth:`_open_link` and :meth:`_close_link`."""

    kind: str = "abstract"
    has_keypad: bool = False

    def __init__(self, name: str):
        self.name = name
        self._worker_ident: int | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"reader:{name}"[:40], initializer=self._mark_worker)
        self._lock = asyncio.Lock()
        self._closed = False

    def _mark_worker(self) -> None:
        self._worker_ident = threading.get_ident()

    # -- for subclasses (worker thread) -------------------------------------------------------

    @abc.abstractmethod
    def _open_link(self) -> CardLink:
        """Connect to the card exclusively (worker thread). Raises LinkError."""

    @abc.abstractmethod
    def _close_link(self, link: CardLink, reset: bool) -> None:
        """Release the card; ``reset`` resets it (after an operation that verified the PIN)."""

    def _card_present(self) -> bool:
        """Whether a card is in the reader now (worker thread)."""
        return True

    def _shutdown(self) -> None:  # noqa: B027 - optional hook
        """Release everything (worker thread)."""

    # -- async API ----------------------------------------------------------------------------

    async def run(self, op: Callable[[CardLink], T], *, reset_after: bool = False) -> T:
        """Run ``op`` with the card held exclusively; link failures become named errors."""
        if self._closed:
            raise SSCardError("READER_NOT_CONNECTED", reader=self.name)
        async with self._lock:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor, self._run_sync, op, reset_after)

    def _run_sync(self, op: Callable[[CardLink], T], reset_after: bool) -> T:
        try:
            link = self._open_link()
        except LinkError as exc:
            raise map_link_error(exc, self.name) from None
        ok = False
        try:
            result = op(link)
            ok = True
            return result
        except LinkError as exc:
            raise map_link_error(exc, self.name) from None
        finally:
            # The card or reader may be gone already; the operation's outcome stands.
            with contextlib.suppress(LinkError):
                self._close_link(link, reset_after or not ok)

    def call_blocking(self, op: Callable[[CardLink], T], *, reset_after: bool = False,
                      timeout: float | None = None) -> T:
        """Run ``op`` in this reader's thread and wait — from *another* reader's worker thread.

        A card operation that needs the PSAM (which sits in another reader) calls it this way,
        so each reader's handle is only ever used by its own thread. ``timeout`` bounds the wait
        (a reader stalled by a foreign PC/SC transaction must not hold the card for ever).
        """
        if self._closed:
            raise SSCardError("READER_NOT_CONNECTED", reader=self.name)
        if threading.get_ident() == self._worker_ident:
            raise SSCardError("BAD_PARAMETER", "the card and the PSAM cannot share one reader",
                              reader=self.name)
        future = self._executor.submit(self._run_sync, op, reset_after)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise SSCardError("READER_UNAVAILABLE", f"no answer within {timeout:g} s",
                              reader=self.name) from None

    async def present(self) -> bool:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._card_present)

    async def in_thread(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` in this reader's worker thread (for reader-specific helpers)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._shutdown)
        await asyncio.to_thread(self._executor.shutdown, True)  # never block the event loop

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


def map_link_error(exc: LinkError, reader: str) -> SSCardError:
    if isinstance(exc, NoCardError):
        return SSCardError("NO_CARD", reader=reader)
    if isinstance(exc, CardRemovedError):
        return SSCardError("CARD_REMOVED", reader=reader)
    if isinstance(exc, ReaderGoneError):
        return SSCardError("READER_GONE", reader=reader)
    if isinstance(exc, ReaderChecksumError):
        return SSCardError("READER_CHECKSUM", str(exc), reader=reader)
    if isinstance(exc, KeypadUnsupported):
        return SSCardError("UNSUPPORTED", "this reader has no keypad", reader=reader)
    return SSCardError("CARD_NO_ANSWER", str(exc), reader=reader)

