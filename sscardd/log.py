"""Logging for the daemon: the project's redacting chain (:mod:`apdu_specs.redaction`) plus the
APDU trace hook.

APDU traces log the command header, the body only for an allow-list of commands that carry
neither a PIN nor holder data, and of the response only its length and status word — a READ
RECORD answer holds the ID number and name.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Mapping
from types import TracebackType
from typing import Any

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
           "install_exception_hooks", "redact", "redact_exception_text", "redact_text", "response_summary"]

_apdu_log = structlog.get_logger("sscardd.apdu")


def apdu_trace(label: str, capdu: bytes, rapdu: bytes) -> None:
    """The APDU trace hook (see :class:`sscardd.transport.Exchanger`)."""
    _apdu_log.debug("apdu", link=label, c=apdu_summary(capdu), r=response_summary(rapdu))


_crash_log = structlog.get_logger("sscardd.crash")


def _excepthook(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, exc, tb)
        return
    _crash_log.critical("uncaught exception", exc_info=(kind, exc, tb))


def _thread_excepthook(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    _crash_log.error("uncaught exception in a thread", thread=getattr(args.thread, "name", None),
                     exc_info=(args.exc_type, args.exc_value or args.exc_type(), args.exc_traceback))


def _asyncio_handler(loop: asyncio.AbstractEventLoop, context: Mapping[str, Any]) -> None:
    exc = context.get("exception")
    # context["message"] and the task's repr may hold arguments: only the exception is logged.
    what = type(exc).__name__ if exc is not None else "no exception"
    _crash_log.error("asyncio: unhandled error", what=what,
                     exc_info=(type(exc), exc, exc.__traceback__) if isinstance(exc, BaseException) else None)


def _unraisable_hook(info: Any) -> None:
    exc = getattr(info, "exc_value", None)
    _crash_log.error("unraisable exception", what=type(getattr(info, "object", None)).__name__,
                     exc_info=(type(exc), exc, exc.__traceback__) if isinstance(exc, BaseException) else None)


def install_exception_hooks(loop: asyncio.AbstractEventLoop | None = None) -> None:
    """Route uncaught exceptions (main thread, other threads, and the event loop's handler when
    ``loop`` is given) through the redacting chain, so a traceback never prints a PIN, an ID
    number or a name past it."""
    sys.excepthook = _excepthook
    threading.excepthook = _thread_excepthook
    sys.unraisablehook = _unraisable_hook
    if loop is not None:
        loop.set_exception_handler(_asyncio_handler)
