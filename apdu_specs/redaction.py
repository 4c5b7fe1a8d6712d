"""One redacting log chain for every program of the project (daemon, backend simulator).

structlog for our code, the standard library's root logger (dependencies such as aiomqtt and
paho) routed through the same processor chain, and one redaction processor early in it: PIN,
PIN-block, password, key and cryptogram fields become ``***``, ID numbers are masked
(``3702**********1237``, also inside free text and rendered tracebacks), names keep their first
character (``张*``). It lives here, beside the masks, because the daemon and the backend may both
import ``apdu_specs`` but not each other.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

from apdu_specs.identifiers import mask_name, mask_ssn

SECRET_KEYS = frozenset({
    "pin", "old_pin", "new_pin", "new_pin_again", "pin_block", "block", "password",
    "portal_password", "new_password", "pkey", "key", "cryptogram",
})
ID_KEYS = frozenset({"ssn", "id_number", "certno", "id_no"})
NAME_KEYS = frozenset({"name", "holder_name", "psn_name"})
# An 18-character PRC ID number standing alone in text.
_ID_IN_TEXT = re.compile(r"(?<![0-9A-Za-z])(\d{6})(\d{8})(\d{3}[0-9Xx])(?![0-9A-Za-z])")
REDACTED = "***"


def redact_text(text: str) -> str:
    """Mask ID numbers found anywhere in ``text``."""
    return _ID_IN_TEXT.sub(lambda m: mask_ssn(m.group(0)), text)


def _redact_value(key: str, value: Any) -> Any:
    k = key.lower()
    if k in SECRET_KEYS or k.endswith("_pin") or k.endswith("password"):
        return REDACTED
    if isinstance(value, str):
        if k in ID_KEYS:
            return mask_ssn(value)
        if k in NAME_KEYS:
            return mask_name(value)
        return redact_text(value)
    if isinstance(value, dict):
        return {kk: _redact_value(str(kk), vv) for kk, vv in value.items()}
    if isinstance(value, list | tuple):
        return [_redact_value(key, v) for v in value]
    return value


def redact(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: masks secrets and personal data in every field and the event text."""
    for key in list(event_dict):
        if key == "exc_info":
            continue
        event_dict[key] = _redact_value(key, event_dict[key])
    return event_dict


def redact_exception_text(_logger: Any, _method: str,
                          event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """After exception formatting: the rendered traceback goes through the text masks too."""
    exc = event_dict.get("exception")
    if isinstance(exc, str):
        event_dict["exception"] = redact_text(exc)
    return event_dict


# Commands whose data field may be logged: it carries no PIN and no personal data. Everything
# else (VERIFY, CHANGE PIN, 84 24, UPDATE RECORD/BINARY with holder data, the PSAM's CIPHER DATA
# over such a record) is logged as header and length only.
_LOGGABLE_BODY = {(0x00, 0xA4), (0x00, 0xB0), (0x00, 0xB2), (0x00, 0x84), (0x00, 0xC0),
                  (0x00, 0x88), (0x00, 0x82), (0xBF, 0xDE), (0xBF, 0xEC)}


def apdu_summary(apdu: bytes) -> str:
    """A C-APDU for logs: the header, and the body only for commands that carry neither a PIN
    nor holder data (the emulator's trace and the daemon's use the same rule)."""
    if len(apdu) > 5 and (apdu[0] & ~0x04 & 0xFF, apdu[1]) not in _LOGGABLE_BODY:
        return f"{apdu[:5].hex().upper()} <{len(apdu) - 5} bytes redacted>"
    return apdu.hex().upper()


def response_summary(resp: bytes) -> str:
    """An R-APDU for logs: its length and status word, never its data."""
    if len(resp) < 2:
        return f"<{len(resp)} bytes>"
    return f"<{len(resp) - 2} bytes> {resp[-2:].hex().upper()}"


def configure(level: str | int = "INFO", json: bool | None = None, stream: Any = None) -> None:
    """Set up structlog and the standard library's root logger to share one redacting chain.

    ``json``: JSON lines (default when the stream is not a TTY), else the console renderer.
    """
    stream = stream or sys.stderr
    if json is None:
        json = not getattr(stream, "isatty", lambda: False)()
    lvl = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    pre: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact,
    ]
    renderer: Any = (structlog.processors.JSONRenderer(ensure_ascii=False) if json
                     else structlog.dev.ConsoleRenderer(colors=False))
    structlog.configure(
        processors=[structlog.stdlib.filter_by_level, *pre,
                    structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=pre,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info, redact_exception_text, renderer],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(lvl)
