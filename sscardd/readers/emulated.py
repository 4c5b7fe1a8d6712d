"""The emulated reader: a ``firmware_sim`` card (or PSAM) in-process, with a scripted keypad.

For tests, demos and labs; the only place the daemon imports the emulator. It behaves like a
reader: the card can be removed and inserted, pulled after a given number of APDUs (fault
injection: the operation then fails with CARD_REMOVED), and its keypad is the same firmware the
serial reader runs (:mod:`firmware_sim.keypad`), initial-PIN rules included.

Reader names: ``emulated:IMAGE`` (an image file, written back as the card changes).
"""

from __future__ import annotations

import threading
from pathlib import Path

from firmware_sim.cos import Cos
from firmware_sim.image import PSAM_FORMAT
from firmware_sim.keypad import KeypadConfig, KeypadFirmware, ScriptedKeypad
from firmware_sim.loader import load_card, load_psam
from firmware_sim.store import ImageError, TearSafeStore
from sscardd.errors import SSCardError
from sscardd.readers.base import (
    CardLink,
    CardRemovedError,
    KeypadResult,
    KeypadStatus,
    NoCardError,
    Reader,
)


class _EmulatedLink:
    def __init__(self, reader: EmulatedReader):
        self.reader = reader

    @property
    def atr(self) -> bytes:
        return self.reader.card.atr

    def transmit(self, apdu: bytes) -> bytes:
        r = self.reader
        with r.state_lock:
            if not r.inserted:
                raise CardRemovedError("card removed")
            if r.pull_after is not None:
                if r.pull_after <= 0:
                    r.inserted = False
                    r.pull_after = None
                    r.card.power_off()
                    raise CardRemovedError("card pulled (fault injection)")
                r.pull_after -= 1
            r.apdus += 1
            # under the lock: a removal from another thread never lands mid-command
            return r.card.execute(apdu)

    def reset(self) -> bytes:
        if not self.reader.inserted:
            raise CardRemovedError("card removed")
        self.reader.card.reset()
        return self.reader.card.atr

    def keypad_verify(self, timeout: float) -> KeypadResult:
        outcome, sw = self.reader.firmware.verify(self.transmit)
        return KeypadResult(KeypadStatus(outcome), sw)

    def keypad_change(self, timeout: float) -> KeypadResult:
        outcome, sw = self.reader.firmware.change(self.transmit)
        return KeypadResult(KeypadStatus(outcome), sw)


class EmulatedReader(Reader):
    kind = "emulated"
    has_keypad = True

    def __init__(self, card: Cos, name: str = "emulated", keypad: ScriptedKeypad | None = None,
                 keypad_config: KeypadConfig | None = None):
        super().__init__(name)
        self.card = card
        self.keypad = keypad or ScriptedKeypad()
        self.firmware = KeypadFirmware(self.keypad, keypad_config or KeypadConfig())
        self.state_lock = threading.Lock()
        self.inserted = True
        self.pull_after: int | None = None
        self.apdus = 0

    @classmethod
    def from_image(cls, path: str | Path, **kw: object) -> EmulatedReader:
        """A reader holding the card or PSAM image at ``path`` (the format tells which)."""
        try:
            is_psam = TearSafeStore(Path(path)).load().get("format") == PSAM_FORMAT
            card: Cos = load_psam(Path(path)) if is_psam else load_card(Path(path))
        except ImageError as exc:
            raise SSCardError("READER_UNAVAILABLE", str(exc), reader=f"emulated:{path}") from None
        return cls(card, name=f"emulated:{path}", **kw)  # type: ignore[arg-type]

    # fault and presence control (any thread)
    def remove(self) -> None:
        with self.state_lock:
            self.inserted = False
            self.card.power_off()

    def insert(self) -> None:
        with self.state_lock:
            self.inserted = True
            self.card.power_on()

    def pull_card_after(self, n: int) -> None:
        """Remove the card when the (n+1)-th APDU from now is sent."""
        with self.state_lock:
            self.pull_after = n

    # Reader
    def _open_link(self) -> CardLink:
        if not self.inserted:
            raise NoCardError("no card")
        return _EmulatedLink(self)

    def _close_link(self, link: CardLink, reset: bool) -> None:
        if reset and self.inserted:
            self.card.reset()

    def _card_present(self) -> bool:
        return self.inserted
