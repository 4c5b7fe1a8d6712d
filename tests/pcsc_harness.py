"""The lab tooling of :mod:`firmware_sim.lab` for the tests and the benchmark, plus the floor card.

Everything about pcscd, helper processes and PC/SC calls lives in ``firmware_sim/lab.py`` (the
demo and technicians use it without the test suite); this module re-exports it and adds what
only the tests and ``bench/`` need. ``conftest.py`` turns :class:`PcscdUnavailable` into a skip.
"""

from __future__ import annotations

import sys
from pathlib import Path

from firmware_sim.lab import (
    PCSCD_PID_FILE,
    PCSCD_SOCKET,
    SELECT_MF,
    VPCD_CONFIG,
    VPCD_DRIVER,
    VPCD_PORT,
    VPCD_READERS,
    CardConnection,
    Pcscd,
    PcscdUnavailable,
    PcscError,
    PyscardMissing,
    card_process,
    find_pcscd,
    list_readers,
    pcsc_context,
    scard,
    sscard_emu_argv,
    start_process,
    stop_process,
    transmit,
    wait_card_state,
)

__all__ = [
    "PCSCD_PID_FILE",
    "PCSCD_SOCKET",
    "REPO_ROOT",
    "SELECT_MF",
    "VPCD_CONFIG",
    "VPCD_DRIVER",
    "VPCD_PORT",
    "VPCD_READERS",
    "CardConnection",
    "PcscError",
    "Pcscd",
    "PcscdUnavailable",
    "PyscardMissing",
    "card_process",
    "find_pcscd",
    "floor_card_argv",
    "list_readers",
    "pcsc_context",
    "scard",
    "sscard_emu_argv",
    "start_process",
    "stop_process",
    "transmit",
    "wait_card_state",
]

REPO_ROOT = Path(__file__).resolve().parent.parent


def floor_card_argv(port: int = VPCD_PORT, python: str = sys.executable) -> list[str]:
    """Command line of the floor card (answers every APDU with 90 00) on vpcd ``port``."""
    return [python, str(REPO_ROOT / "bench" / "floor_card.py"), "--vpcd", f"127.0.0.1:{port}"]
