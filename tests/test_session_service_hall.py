"""Service-hall operations of the card session: PIN unblock and reload (PUK rights in the PSAM) and
the chip's settlement log, over the emulated, PC/SC (pcscd + vpcd) and serial rigs, both card
generations.

The rigs of tests/rigs.py carry a terminal PSAM (no PUK); a service-hall PSAM
(``SERVICE_HALL_KEYS``) is added beside it in an emulated reader, the way the serial rig keeps its
PSAM emulated.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from apdu_specs import crypto
from apdu_specs.psam import SERVICE_HALL_KEYS
from apdu_specs.redaction import apdu_summary
from firmware_sim.personalise import issue_psam
from firmware_sim.sscard import SocialSecurityCard
from firmware_sim.store import TearSafeStore
from sscardd.errors import SSCardError
from sscardd.psam import PsamClient
from sscardd.readers.base import Reader
from sscardd.readers.emulated import EmulatedReader
from sscardd.session import CardSession, PinPolicy, TxnRecord
from sscardd.transport import Exchanger
from tests.emu import roots
from tests.rigs import GOOD, INITIAL, Rig, emulated_rig, load_image, pcsc_rig, serial_rig

RIGS = ["emulated", "pcsc", "serial"]
NEW = "135790"
PUK_EXTERNAL_AUTH = bytes.fromhex("00820006")


@dataclass
class HallRig:
    rig: Rig
    hall_psam: Reader
    apdus: list[tuple[str, bytes]]

    def session(self, hall: bool = True, trace: bool = False) -> CardSession:
        """A session with the service-hall PSAM (``hall``) or the rig's terminal PSAM."""
        reader = self.hall_psam if hall else self.rig.psam_reader
        assert reader is not None
        hook = self._trace if trace else None
        return CardSession(self.rig.card_reader, PsamClient(reader, hook),
                           pin_policy=PinPolicy(frozenset({INITIAL})), trace=hook)

    def _trace(self, label: str, capdu: bytes, rapdu: bytes) -> None:
        self.apdus.append((label, capdu))

    def puk_tries(self) -> int:
        assert self.rig.card_image is not None
        return load_image(self.rig.card_image).keys["PUK"].tries

    def pin_tries(self) -> int:
        assert self.rig.card_image is not None
        return load_image(self.rig.card_image).pin.tries

    @property
    def card(self) -> SocialSecurityCard | None:
        """The card object of the in-process emulated rig (None over other transports)."""
        if self.rig.kind != "emulated":
            return None
        card = self.rig.card_reader.card  # type: ignore[attr-defined]
        assert isinstance(card, SocialSecurityCard)
        return card


@pytest.fixture(params=[2, 3], ids=lambda g: f"gen{g}")
def generation(request: pytest.FixtureRequest) -> int:
    return int(request.param)


@pytest.fixture(params=RIGS)
async def hall(request: pytest.FixtureRequest, tmp_path: Path, generation: int) -> AsyncIterator[HallRig]:
    if request.param == "pcsc":
        request.getfixturevalue("pcscd")
        rig = pcsc_rig(tmp_path, generation)
    elif request.param == "serial":
        rig = serial_rig(tmp_path, generation)
    else:
        rig = emulated_rig(tmp_path, generation)
    image = tmp_path / "hall-psam.json"
    TearSafeStore(image).save(issue_psam(roots(), key_names=SERVICE_HALL_KEYS).to_json())
    psam = EmulatedReader.from_image(image)
    try:
        yield HallRig(rig, psam, [])
    finally:
        await psam.close()
        await rig.close()


async def _code(coro: object) -> str:
    with pytest.raises(SSCardError) as ei:
        await coro  # type: ignore[misc]
    return ei.value.code


async def _verify_state(rig: Rig) -> int:
    """The chip's own answer to the VERIFY query (``00 20 00 00``) in the SSSE."""

    def query(link: object) -> int:
        ex = Exchanger(link)  # type: ignore[arg-type]
        ex.send(bytes.fromhex("00A404000F7378312E73682EC9E7BBE1B1A3D5CF"))
        return ex.send(bytes.fromhex("00200000")).sw

    return await rig.card_reader.run(query)


async def _block_pin(s: CardSession) -> None:
    assert await _code(s.verify_pin("999999")) == "PIN_WRONG"
    assert await _code(s.verify_pin("999999")) == "PIN_WRONG"
    assert await _code(s.verify_pin("999999")) == "PIN_BLOCKED"
    assert await _code(s.verify_pin(GOOD)) == "PIN_BLOCKED"


# --- unblock ---------------------------------------------------------------------------------------


async def test_unblock_after_three_wrong_tries(hall: HallRig) -> None:
    s = hall.session()
    await _block_pin(s)
    assert hall.pin_tries() == 0
    await s.unblock_pin()
    assert hall.pin_tries() == 3 and hall.puk_tries() == 3
    assert await _verify_state(hall.rig) == 0x63C3  # reset afterwards, nothing verified
    await s.verify_pin(GOOD)  # the PIN itself is unchanged


async def test_unblock_of_a_pin_that_is_not_blocked_restores_the_counter(hall: HallRig) -> None:
    s = hall.session()
    assert await _code(s.verify_pin("999999")) == "PIN_WRONG"
    assert hall.pin_tries() == 2
    await s.unblock_pin()
    assert hall.pin_tries() == 3


async def test_unblock_apdus(hall: HallRig, generation: int) -> None:
    """Internal authentication, EXTERNAL AUTHENTICATE with PUK, a fresh challenge, then
    ``84 24 00 00 04 <MAC>`` as the last card command."""
    await hall.session(trace=True).unblock_pin()
    card = [c for label, c in hall.apdus if label == "card"]
    ins = [c[1] for c in card]
    assert ins.index(0x88) < ins.index(0x82)  # the card proved genuine first
    assert [c[:4] for c in card if c[1] == 0x82] == [PUK_EXTERNAL_AUTH]
    assert card[-2][:2] == bytes.fromhex("0084")
    assert card[-1][:5] == bytes.fromhex("8424000004") and len(card[-1]) == 9


# --- reload ----------------------------------------------------------------------------------------


async def test_reload_sets_a_new_pin(hall: HallRig, generation: int) -> None:
    s = hall.session(trace=True)
    await s.reload_pin(NEW)
    last = [c for label, c in hall.apdus if label == "card"][-1]
    bs = 16 if generation == 3 else 8
    assert last[:5] == bytes((0x84, 0x24, 0x00, 0x01, bs + 4)) and len(last) == 5 + bs + 4
    assert await _verify_state(hall.rig) == 0x63C3
    await s.verify_pin(NEW)
    assert await _code(s.verify_pin(GOOD)) == "PIN_WRONG"
    await s.verify_pin(NEW)


async def test_reload_of_a_blocked_pin(hall: HallRig) -> None:
    s = hall.session()
    await _block_pin(s)
    await s.reload_pin(NEW)
    assert hall.pin_tries() == 3
    await s.verify_pin(NEW)


async def test_reload_refuses_an_initial_pin_or_a_bad_length(hall: HallRig) -> None:
    s = hall.session(trace=True)
    assert await _code(s.reload_pin(INITIAL)) == "PIN_TO_INITIAL"
    assert await _code(s.reload_pin("12")) == "PIN_LENGTH"
    assert await _code(s.reload_pin("12ab56")) == "PIN_LENGTH"
    assert await _code(s.reload_pin("1" * 13)) == "PIN_LENGTH"
    assert hall.apdus == []  # refused before the card was touched
    await s.verify_pin(GOOD)


async def test_pins_stay_out_of_traces_and_errors(hall: HallRig) -> None:
    s = hall.session(trace=True)
    await s.reload_pin(NEW)
    pin_hex = crypto.pin_to_bcd(NEW).hex().upper()
    summaries = [apdu_summary(c) for _, c in hall.apdus]
    assert any(label == "psam" for label, _ in hall.apdus)
    assert not any(pin_hex in t for t in summaries)
    # nothing the card sees carries the PIN in clear either (the reload data is enciphered)
    assert not any(pin_hex in c.hex().upper() for label, c in hall.apdus if label == "card")
    with pytest.raises(SSCardError) as ei:
        await s.reload_pin(INITIAL)
    assert INITIAL not in str(ei.value) and INITIAL not in repr(ei.value.to_dict())


# --- authorisation ---------------------------------------------------------------------------------


async def test_terminal_psam_lacks_puk_rights(hall: HallRig) -> None:
    s = hall.session(hall=False, trace=True)
    await _code(s.verify_pin("999999"))
    for op in (s.unblock_pin(), s.reload_pin(NEW)):
        with pytest.raises(SSCardError) as ei:
            await op
        assert ei.value.code == "PSAM_KEY_LEVEL" and ei.value.compat_code == -24
    # no EXTERNAL AUTHENTICATE was sent: the card's PUK counter is where it was
    assert not any(c[:4] == PUK_EXTERNAL_AUTH for label, c in hall.apdus if label == "card")
    assert hall.puk_tries() == 3 and hall.pin_tries() == 2
    card = hall.card
    if card is not None:
        assert card.image.keys["PUK"].tries == 3 and card.image.pin.tries == 2
    await hall.session().verify_pin(GOOD)  # the PIN is unchanged


async def test_unblock_and_reload_need_a_psam(hall: HallRig) -> None:
    s = CardSession(hall.rig.card_reader, None)
    assert await _code(s.unblock_pin()) == "NO_PSAM"
    assert await _code(s.reload_pin(NEW)) == "NO_PSAM"


async def test_puk_counter_after_a_blocked_puk(tmp_path: Path) -> None:
    """A card whose PUK is blocked refuses the external authentication (6983): the error is the
    card's status, and nothing changes."""
    h = emulated_rig(tmp_path, 3)
    image = tmp_path / "hall-psam.json"
    TearSafeStore(image).save(issue_psam(roots(), key_names=SERVICE_HALL_KEYS).to_json())
    psam = EmulatedReader.from_image(image)
    try:
        card = h.card_reader.card  # type: ignore[attr-defined]
        card.image.keys["PUK"].tries = 0
        s = CardSession(h.card_reader, PsamClient(psam), pin_policy=PinPolicy(frozenset({INITIAL})))
        with pytest.raises(SSCardError) as ei:
            await s.reload_pin(NEW)
        assert ei.value.code == "CARD_STATUS" and ei.value.details["sw"] == 0x6983
        await s.verify_pin(GOOD)
    finally:
        await psam.close()
        await h.close()


# --- settlement log ----------------------------------------------------------------------------------


async def test_settlement_records_newest_first(hall: HallRig) -> None:
    s = hall.session()
    assert await s.settlement_records(GOOD) == []
    assert await s.record_settlement(TxnRecord(7, "370212000001", "20261125103000", 5200, 1100, 0))
    assert await s.record_settlement(TxnRecord(8, "370212000002", "20261126093005", 1250, 100, 1000))
    records = await s.settlement_records(GOOD)
    assert records == [
        {"seq": 8, "txn_type": "2", "terminal": "370212000002", "time": "2026-11-26 09:30:05",
         "account": "12.50", "self_pay": "1.00", "fund": "10.00"},
        {"seq": 7, "txn_type": "2", "terminal": "370212000001", "time": "2026-11-25 10:30:00",
         "account": "52.00", "self_pay": "11.00", "fund": "0.00"},
    ]
    assert await _verify_state(hall.rig) == 0x63C3  # a PIN was verified: the card was reset


async def test_settlement_records_with_a_wrong_pin(hall: HallRig) -> None:
    s = hall.session()
    with pytest.raises(SSCardError) as ei:
        await s.settlement_records("999999")
    assert ei.value.code == "PIN_WRONG" and ei.value.details["tries_left"] == 2
    assert await _code(s.settlement_records("12")) == "PIN_LENGTH"


async def test_settlement_records_on_the_keypad(hall: HallRig) -> None:
    s = hall.session()
    if hall.rig.keypad is None:
        assert await _code(s.settlement_records(None)) == "INVALID_INPUT"
        return
    assert await s.record_settlement(TxnRecord(1, "370212000001", "20261125103000", 5200, 1100, 0))
    hall.rig.type_keys(GOOD)
    assert [r["seq"] for r in await s.settlement_records(None)] == [1]
    hall.rig.type_keys("999999")
    assert await _code(s.settlement_records(None)) == "PIN_WRONG"


async def test_settlement_records_skip_blank_records(hall: HallRig) -> None:
    card = hall.card
    if card is None:
        pytest.skip("blank records are planted in the in-process card")
    s = hall.session()
    assert await s.record_settlement(TxnRecord(1, "370212000001", "20261125103000", 5200, 1100, 0))
    recs = card.image.files["SSSE/DF04/EF08"].records
    assert recs is not None
    recs.insert(0, b"\xff" * 0x1C)
    recs.append(bytes(0x1C))
    assert [r["seq"] for r in await s.settlement_records(GOOD)] == [1]
    recs.insert(0, bytes.fromhex("0002" "32" "370212000001" "20261399103000") + bytes(12))
    assert await _code(s.settlement_records(GOOD)) == "CARD_GARBAGE"  # month 13
