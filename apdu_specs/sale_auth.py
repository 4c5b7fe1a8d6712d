"""The card cryptogram every settlement carries, so no sale is booked without the genuine card.

The daemon sends the card an INTERNAL AUTHENTICATE whose two 8-byte inputs are derived from the
sale itself and the terminal that makes it; the backend recomputes the expected answer with its
own root IRK, diversified down to the card (card-spec §4.3) from the card identification code's
region and the ATR's historical bytes, which the request carries too. A replayed or altered
request (other ``msgid``, other total, another terminal) yields other inputs and fails.

Derivation (documented contract between daemon and backend)::

    d = SHA-256("sscardd sale v1|" ‖ terminal_id ‖ "|" ‖ msgid ‖ "|" ‖ total)
                                       # terminal_id: 12 digits; total: yuan, two decimals, "12.50"
    session_input = d[0:8]
    plain         = d[8:16]
    cryptogram    = INTERNAL AUTHENTICATE(session_input, plain) = auth(IRK_card, session_input, plain)
"""

from __future__ import annotations

import hashlib
import hmac
import re

from apdu_specs import crypto
from apdu_specs.crypto import Algorithm

_MONEY = re.compile(r"^(0|[1-9][0-9]{0,9})\.[0-9]{2}$")


def sale_challenge(msgid: str, total: str, terminal_id: str) -> tuple[bytes, bytes]:
    """``(session_input, plain)`` for the sale's INTERNAL AUTHENTICATE."""
    if not isinstance(terminal_id, str) or len(terminal_id) != 12 or not (
            terminal_id.isascii() and terminal_id.isdigit()):
        raise ValueError("terminal_id must be 12 digits")
    if not isinstance(msgid, str) or not msgid or len(msgid) > 64:
        raise ValueError("msgid must be a non-empty string of at most 64 characters")
    if not isinstance(total, str) or not _MONEY.match(total):
        raise ValueError("total must be yuan with two decimals, e.g. '12.50'")
    d = hashlib.sha256(f"sscardd sale v1|{terminal_id}|{msgid}|{total}".encode()).digest()
    return d[0:8], d[8:16]


def card_cryptogram(alg: Algorithm, card_irk: bytes, msgid: str, total: str, terminal_id: str) -> bytes:
    """What the card holding ``card_irk`` (its diversified IRK) answers for this sale."""
    session_input, plain = sale_challenge(msgid, total, terminal_id)
    return crypto.auth_data(alg, card_irk, session_input, plain)


def expected_cryptogram(alg: Algorithm, root_irk: bytes, region: str, historical: bytes,
                        msgid: str, total: str, terminal_id: str) -> bytes:
    """What the genuine card answers for this sale (the backend's check)."""
    card_irk = crypto.derive(alg, root_irk, crypto.diversification_factors(region, historical))
    return card_cryptogram(alg, card_irk, msgid, total, terminal_id)


def check_cryptogram(alg: Algorithm, root_irk: bytes, region: str, historical: bytes, msgid: str,
                     total: str, terminal_id: str, cryptogram: bytes) -> bool:
    try:
        expected = expected_cryptogram(alg, root_irk, region, historical, msgid, total, terminal_id)
    except (ValueError, crypto.CryptoError):
        return False
    return hmac.compare_digest(expected, cryptogram)
