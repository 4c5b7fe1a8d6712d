"""Serving emulated cards into a real pcscd through vpcd, with removal and re-insertion.

One :class:`Slot` per vpcd slot (card in slot 0, PSAM in slot 1 by default). Each runs a thread
that keeps its card inserted: it connects to vpcd, answers until the link ends, and reconnects
(with a short backoff) unless the card was removed on purpose. ``remove()``/``insert()`` pull and
re-insert the card; the ``sscard-emu serve`` command maps them to SIGUSR1/SIGUSR2.
"""

from __future__ import annotations

import logging
import threading
import time

from apdu_specs.redaction import apdu_summary, response_summary
from firmware_sim.vpcd import Card, VpcdLink

log = logging.getLogger(__name__)

def log_trace(label: str) -> object:
    """APDU trace at DEBUG: the command (PIN bodies redacted) and only the length and status
    word of the answer — a READ RECORD answer holds the holder's ID number and name."""

    def trace(cmd: bytes, resp: bytes) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s > %s < %s", label, apdu_summary(cmd), response_summary(resp))

    return trace


class Slot:
    """Keeps one card inserted in one vpcd slot until stopped."""

    def __init__(self, card: Card, host: str, port: int, label: str = "card",
                 retry: float = 0.2):
        self.card = card
        self.host = host
        self.port = port
        self.label = label
        self.retry = retry
        self._want_inserted = threading.Event()
        self._want_inserted.set()
        self._stop = threading.Event()
        self._link: VpcdLink | None = None
        self._lock = threading.Lock()
        self.inserted = threading.Event()
        self.insertions = 0
        self._thread = threading.Thread(target=self._run, name=f"vpcd-{label}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        backoff = self.retry
        while not self._stop.is_set():
            if not self._want_inserted.wait(0.2):
                continue
            link = VpcdLink(self.card, self.host, self.port)
            try:
                link.connect(timeout=2.0)
            except OSError as exc:
                log.debug("%s: vpcd at %s:%d not reachable (%s); retrying", self.label,
                          self.host, self.port, exc)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            backoff = self.retry
            with self._lock:
                self._link = link
            if self._stop.is_set() or not self._want_inserted.is_set():
                link.eject()
                continue
            self.insertions += 1
            self.inserted.set()
            log.info("%s inserted into vpcd %s:%d", self.label, self.host, self.port)
            link.serve()
            self.inserted.clear()
            self.card.power_off()  # a pulled card loses its volatile state
            with self._lock:
                self._link = None
            log.info("%s removed from vpcd %s:%d", self.label, self.host, self.port)
            if self._want_inserted.is_set() and not self._stop.is_set():
                self._stop.wait(self.retry)  # vpcd dropped us; come back like a re-insertion

    def remove(self) -> None:
        """Pull the card out (it stays out until :meth:`insert`)."""
        self._want_inserted.clear()
        with self._lock:
            link = self._link
        if link is not None:
            link.eject()

    def insert(self) -> None:
        self._want_inserted.set()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self.remove()
        self._thread.join(timeout)

    def wait_inserted(self, timeout: float) -> bool:
        return self.inserted.wait(timeout)


def wait_forever(slots: list[Slot], stop: threading.Event) -> None:
    while not stop.is_set():
        stop.wait(0.5)
    for s in slots:
        s.stop()
    time.sleep(0)
