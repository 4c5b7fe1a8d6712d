"""The serial keypad reader's frame protocol (a project definition; see README "Serial reader").

Only the keypad status byte is defined so far; the frame layout follows.
"""

from __future__ import annotations

import enum


class KeypadStatus(enum.IntEnum):
    """Outcome of a keypad PIN operation. Values ≥ 0x31 are the reader-interface codes' digits
    (−31 cancelled … −36 cannot change to an initial PIN)."""

    OK = 0x00
    CARD_STATUS = 0x01  # the card answered a status word other than 9000 (63Cx, 6983, ...)
    CANCELLED = 0x31
    TIMEOUT = 0x32
    BAD_LENGTH = 0x33
    MISMATCH = 0x34
    INITIAL_PIN = 0x35
    TO_INITIAL = 0x36
