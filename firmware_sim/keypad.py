"""A PIN-pad reader's firmware: collect PINs on the keypad and run VERIFY / CHANGE PIN itself.

The host never sees a keypad PIN, so the reader enforces the initial-PIN rules on its own, from
its configuration (the region's issuing defaults): an initial PIN verifies on the chip but the
reader reports ``INITIAL_PIN`` (−35: cannot transact until changed), and changing *to* an initial
PIN is refused before the card is touched (``TO_INITIAL``, −36).

The keypad here is scripted (tests, demos, labs): each entry is the digits a person would type,
``None`` for the cancel key, or :data:`TIMEOUT` for nobody typing.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from apdu_specs import crypto
from apdu_specs.serial_frame import KeypadStatus as KeypadOutcome

TIMEOUT = "<timeout>"


@dataclass
class KeypadConfig:
    initial_pins: tuple[str, ...] = ("123456",)
    min_len: int = 4
    max_len: int = 12


@dataclass
class ScriptedKeypad:
    entries: deque[str | None] = field(default_factory=deque)

    def type(self, *entries: str | None) -> None:
        self.entries.extend(entries)

    def load(self, entries: Iterable[str | None]) -> None:
        self.entries = deque(entries)

    def read(self) -> str | None:
        if not self.entries:  # the script ran out: nobody is typing
            return TIMEOUT
        return self.entries.popleft()


Execute = Callable[[bytes], bytes]  # the card: raw C-APDU in, raw R-APDU out


@dataclass
class KeypadFirmware:
    keypad: ScriptedKeypad
    config: KeypadConfig = field(default_factory=KeypadConfig)

    def _collect(self) -> tuple[KeypadOutcome, str]:
        entry = self.keypad.read()
        if entry is None:
            return KeypadOutcome.CANCELLED, ""
        if entry == TIMEOUT:
            return KeypadOutcome.TIMEOUT, ""
        if not (entry.isascii() and entry.isdigit()) or not (
            self.config.min_len <= len(entry) <= self.config.max_len
        ):
            return KeypadOutcome.BAD_LENGTH, ""
        return KeypadOutcome.OK, entry

    def verify(self, execute: Execute) -> tuple[KeypadOutcome, int]:
        """Collect a PIN and VERIFY it on the card (``execute(apdu) -> response``)."""
        outcome, pin = self._collect()
        if outcome is not KeypadOutcome.OK:
            return outcome, 0
        body = crypto.pin_to_bcd(pin)
        out = execute(bytes((0x00, 0x20, 0x00, 0x00, len(body))) + body)
        sw = int.from_bytes(out[-2:], "big")
        if sw != 0x9000:
            return KeypadOutcome.CARD_STATUS, sw
        if pin in self.config.initial_pins:
            return KeypadOutcome.INITIAL_PIN, sw
        return KeypadOutcome.OK, sw

    def change(self, execute: Execute) -> tuple[KeypadOutcome, int]:
        """Collect old, new and new-again PINs and CHANGE PIN (``80 5E 01 00``)."""
        collected = []
        for _ in range(3):
            outcome, pin = self._collect()
            if outcome is not KeypadOutcome.OK:
                return outcome, 0
            collected.append(pin)
        old, new, again = collected
        if new != again:
            return KeypadOutcome.MISMATCH, 0
        if new in self.config.initial_pins:
            return KeypadOutcome.TO_INITIAL, 0
        body = crypto.pin_to_bcd(old) + b"\xff" + crypto.pin_to_bcd(new)
        out = execute(bytes((0x80, 0x5E, 0x01, 0x00, len(body))) + body)
        sw = int.from_bytes(out[-2:], "big")
        return (KeypadOutcome.OK if sw == 0x9000 else KeypadOutcome.CARD_STATUS), sw
