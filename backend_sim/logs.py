"""Logging for the backend: structlog, JSON lines unless stderr is a terminal, with one redaction
processor early in the chain (the standard library's loggers — aiomqtt, paho — go through it too).

No full ID number, name or password reaches a log line: password and key fields become ``***``,
ID numbers are masked ``3702**********1237`` (also inside free text), names keep their first
character (``张*``). The request path logs ids and outcomes, never payloads.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

from apdu_specs.identifiers import mask_name, mask_ssn

SECRET_KEYS = frozenset({"password", "new_password", "portal_password", "pin", "key", "cryptogram"})
ID_KEYS = frozenset({"ssn", "certno", "id_number"})
NAME_KEYS = frozenset({"name", "psn_name"})
_ID_IN_TEXT = re.compile(r"(?<![0-9A-Za-z])\d{17}[0-9Xx](?![0-9A-Za-z])")
REDACTED = "***"


def redact_text(text: str) -> str:
    return _ID_IN_TEXT.sub(lambda m: mask_ssn(m.group(0)), text)


def _redact_value(key: str, value: Any) -> Any:
    k = key.lower()
    if k in SECRET_KEYS or k.endswith("password"):
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
    """structlog processor: masks secrets and personal data in every field."""
    for key in list(event_dict):
        if key != "exc_info":
            event_dict[key] = _redact_value(key, event_dict[key])
    return event_dict


def _redact_exception(_logger: Any, _method: str,
                      event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    exc = event_dict.get("exception")
    if isinstance(exc, str):
        event_dict["exception"] = redact_text(exc)
    return event_dict


def configure(level: str | int = "INFO", json: bool | None = None, stream: Any = None) -> None:
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
                    structlog.processors.format_exc_info, _redact_exception, renderer],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(lvl)
