"""Card removal and re-insertion through real pcscd: SIGUSR1 / SIGUSR2 to ``sscard-emu serve``."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from firmware_sim.lab import VPCD_READERS, CardConnection, Pcscd, PcscError, scard, wait_card_state
from tests.e2e.emulator import issue_card, issue_psam, served_in_pcscd, tail

pytestmark = pytest.mark.pcscd

CARD_READER, PSAM_READER = VPCD_READERS
SELECT_SSSE = bytes.fromhex("00A404000F7378312E73682EC9E7BBE1B1A3D5CF")
SELECT_PSAM_APP = bytes.fromhex("00A4040006D15600000590")
SELECT_EF05 = bytes.fromhex("00A4020002EF05")
READ_CARD_NO = bytes.fromhex("00B207000B")
READ_TERMINAL_NO = bytes.fromhex("00B0960006")
READ_PSAM_COUNTER = bytes.fromhex("00B0990004")  # 0019, only inside the application


def test_remove_and_reinsert(pcscd: Pcscd, tmp_path: Path) -> None:
    card_img, psam_img = tmp_path / "card.json", tmp_path / "psam.json"
    issue_card(card_img, "--generation", "2")
    issue_psam(psam_img)
    log = tmp_path / "serve.log"
    sc = scard()
    with served_in_pcscd(card_img, psam=psam_img, log=log) as proc, \
            CardConnection(PSAM_READER) as psam:
        assert psam.transmit(READ_TERMINAL_NO) == bytes.fromhex("370212000001") + b"\x90\x00"

        with CardConnection(CARD_READER) as before:
            for apdu in (SELECT_SSSE, SELECT_EF05, READ_CARD_NO):
                assert before.transmit(apdu)[-2:] == b"\x90\x00"

            proc.send_signal(signal.SIGUSR1)
            assert _wait(CARD_READER, present=False), f"card still present; log:\n{tail(log)}"
            assert proc.poll() is None, "serve exited on SIGUSR1"

            # The PSAM in slot 1 stays: present, and the connection opened before still works.
            assert _wait(PSAM_READER, present=True, timeout=0.5)
            assert psam.transmit(SELECT_PSAM_APP)[-2:] == b"\x90\x00"

            with pytest.raises(PcscError) as removed:
                before.transmit(SELECT_SSSE)
            assert removed.value.hresult in (sc.SCARD_W_REMOVED_CARD, sc.SCARD_E_NO_SMARTCARD), (
                f"expected 'card removed', got {removed.value}"
            )
            with pytest.raises(PcscError):
                CardConnection(CARD_READER)

            proc.send_signal(signal.SIGUSR2)
            assert _wait(CARD_READER, present=True), f"card not re-inserted; log:\n{tail(log)}"

            # The old handle stays dead: the card it was opened on is gone.
            with pytest.raises(PcscError):
                before.transmit(SELECT_SSSE)

        with CardConnection(CARD_READER) as after:
            # Re-inserted means powered up afresh: no current EF (6986) until selected again.
            assert after.transmit(READ_CARD_NO) == b"\x69\x86"
            rapdu = after.transmit(SELECT_SSSE)
            assert rapdu[-2:] == b"\x90\x00" and rapdu[:2] == b"\x6f\x1c"
            assert after.transmit(SELECT_EF05) == b"\x90\x00"
            assert after.transmit(READ_CARD_NO)[:2] == b"\x07\x09"

        # The PSAM connection lived through it all, without a reset: still in its application.
        assert psam.transmit(READ_PSAM_COUNTER)[-2:] == b"\x90\x00"
        assert proc.poll() is None



def _wait(reader: str, present: bool, timeout: float = 10.0) -> bool:
    return wait_card_state(reader, present=present, timeout=timeout)
