"""The pcscd harness itself, with the floor card (bench/floor_card.py) on vpcd slot 0."""

from __future__ import annotations

import pytest

from tests.pcsc_harness import (
    SELECT_MF,
    VPCD_PORT,
    VPCD_READERS,
    Pcscd,
    card_process,
    floor_card_argv,
    list_readers,
    transmit,
    wait_card_state,
)

pytestmark = pytest.mark.pcscd

READER = VPCD_READERS[0]


def _insert_transmit_remove() -> None:
    with card_process(floor_card_argv(VPCD_PORT)) as card:
        assert wait_card_state(READER, present=True, timeout=10), "card never seen present"
        assert transmit(READER, SELECT_MF) == b"\x90\x00"
        assert card.poll() is None, "the floor card exited while inserted"
    assert wait_card_state(READER, present=False, timeout=10), "card never seen absent"


def test_readers_listed(pcscd: Pcscd) -> None:
    readers = list_readers()
    assert readers is not None
    assert set(VPCD_READERS) <= set(readers)


def test_insert_transmit_remove_reinsert(pcscd: Pcscd) -> None:
    assert wait_card_state(READER, present=False, timeout=5), (
        f"{READER} already holds a card: another emulator is connected to port {VPCD_PORT}"
    )
    _insert_transmit_remove()
    # One TCP connection is one insertion; vpcd must accept the next one.
    _insert_transmit_remove()


def test_restart_own_pcscd(own_pcscd: Pcscd) -> None:
    own_pcscd.restart()
    assert set(VPCD_READERS) <= set(own_pcscd.readers)
    _insert_transmit_remove()
