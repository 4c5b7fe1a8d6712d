"""Logging for the daemon: the project's redacting chain (:mod:`apdu_specs.redaction`) plus the
APDU trace hook.

APDU traces log the command header, the body only for an allow-list of commands that carry
neither a PIN nor holder data, and of the response only its length and status word — a READ
RECORD answer holds the ID number and name.
"""

from __future__ import annotations

import structlog

from apdu_specs.redaction import (
    ID_KEYS,
    NAME_KEYS,
    REDACTED,
    SECRET_KEYS,
    apdu_summary,
    configure,
    redact,
    redact_exception_text,
    redact_text,
    response_summary,
)

__all__ = ["ID_KEYS", "NAME_KEYS", "REDACTED", "SECRET_KEYS", "apdu_summary", "apdu_trace", "configure",
           "redact", "redact_exception_text", "redact_text", "response_summary"]

_apdu_log = structlog.get_logger("sscardd.apdu")


def apdu_trace(label: str, capdu: bytes, rapdu: bytes) -> None:
    """The APDU trace hook (see :class:`sscardd.transport.Exchanger`)."""
    _apdu_log.debug("apdu", link=label, c=apdu_summary(capdu), r=response_summary(rapdu))
