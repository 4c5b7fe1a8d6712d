"""Uncaught exceptions — main thread, other threads, asyncio's handler — go through the redacting
chain: a traceback never prints a full ID number or a name past it."""

from __future__ import annotations

import asyncio
import io
import sys
import threading
from collections.abc import Iterator

import pytest

from sscardd import log

SSN = "370202199001011237"


@pytest.fixture
def out() -> Iterator[io.StringIO]:
    buf = io.StringIO()
    saved = sys.excepthook, threading.excepthook
    log.configure("DEBUG", json=True, stream=buf)
    try:
        yield buf
    finally:
        sys.excepthook, threading.excepthook = saved
        log.configure("WARNING")


def check(text: str) -> None:
    assert SSN not in text and "3702**********1237" in text, text


def test_main_thread(out: io.StringIO) -> None:
    log.install_exception_hooks()
    try:
        raise ValueError(f"holder {SSN} refused")
    except ValueError:
        sys.excepthook(*sys.exc_info())  # type: ignore[arg-type]
    check(out.getvalue())
    assert "uncaught exception" in out.getvalue()


def test_other_thread(out: io.StringIO) -> None:
    log.install_exception_hooks()

    def boom() -> None:
        raise RuntimeError(f"card of {SSN}")

    t = threading.Thread(target=boom, name="worker")
    t.start()
    t.join()
    check(out.getvalue())


async def test_asyncio_handler(out: io.StringIO) -> None:
    loop = asyncio.get_running_loop()
    saved = loop.get_exception_handler()
    log.install_exception_hooks(loop)
    try:
        loop.call_exception_handler({"message": f"task failed for {SSN}",
                                     "exception": KeyError(f"{SSN}")})
    finally:
        loop.set_exception_handler(saved)
    assert SSN not in out.getvalue() and "asyncio: unhandled error" in out.getvalue()
