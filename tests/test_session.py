"""The card session over every transport: same tests, emulated / PC/SC / serial rigs."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from apdu_specs import crypto, filesystem
from apdu_specs.crypto import Algorithm
from apdu_specs.identifiers import historical_bytes, validate_card_no, validate_ssn
from apdu_specs.keyfile import RootKeys
from firmware_sim.personalise import CardParams, Holder, issue_card
from firmware_sim.sscard import SocialSecurityCard
from sscardd.errors import SSCardError
from sscardd.psam import PsamClient
from sscardd.readers.emulated import EmulatedReader
from sscardd.session import CardSession, TxnRecord
from tests.emu import roots
from tests.rigs import GOOD, INITIAL, Rig, emulated_rig, load_image, pcsc_rig, serial_rig

RIGS = ["emulated", "pcsc", "serial"]


@pytest.fixture(params=[2, 3], ids=lambda g: f"gen{g}")
def generation(request: pytest.FixtureRequest) -> int:
    return int(request.param)


@pytest.fixture(params=RIGS)
async def rig(request: pytest.FixtureRequest, tmp_path: Path, generation: int) -> AsyncIterator[Rig]:
    if request.param == "pcsc":
        request.getfixturevalue("pcscd")
        r = pcsc_rig(tmp_path, generation)
    elif request.param == "serial":
        r = serial_rig(tmp_path, generation)
    else:
        r = emulated_rig(tmp_path, generation)
    try:
        yield r
    finally:
        await r.close()


async def _code(coro: object) -> str:
    with pytest.raises(SSCardError) as ei:
        await coro  # type: ignore[misc]
    return ei.value.code


@contextlib.asynccontextmanager
async def card_with_genuine_psam(tmp_path: Path, card: object) -> AsyncIterator[CardSession]:
    """A session on ``card`` (any emulated card object) with the project's genuine PSAM."""
    reader = EmulatedReader(card)  # type: ignore[arg-type]
    rig = emulated_rig(tmp_path, 3)
    try:
        yield CardSession(reader, PsamClient(rig.psam_reader))  # type: ignore[arg-type]
    finally:
        await reader.close()
        await rig.close()


def card_from_other_keys() -> SocialSecurityCard:
    """A well-formed generation-3 card personalised under root keys that are not ours."""
    keys = {a: dict.fromkeys(filesystem.all_key_names(), bytes(range(16))) for a in Algorithm
            if a is not Algorithm.SSF33}
    return SocialSecurityCard(issue_card(CardParams(generation=3), RootKeys("test", keys)))


# --- identity --------------------------------------------------------------------------------------


async def test_read_basic(rig: Rig, generation: int) -> None:
    info = await rig.session().read_basic()
    validate_ssn(info.ssn)
    validate_card_no(info.card_no)
    assert info.name == "张三"
    assert info.generation == generation
    assert info.algorithm is (Algorithm.SM4 if generation == 3 else Algorithm.DES3)
    assert info.terminal_no == "370212000001"
    compat = info.compat()
    fields = compat.split("|")
    assert len(fields) == 12 and fields[-1] == ""
    assert fields[0] == "370202" and fields[4] == "张三"
    assert fields[6] == ("3.00" if generation == 3 else "2.00")
    assert fields[3] == info.card_id.hex().upper() and len(fields[3]) == 32
    assert len(fields[5]) == 26
    assert info.to_json()["compat"] == compat


async def test_no_psam_offers_the_hsm_two_step_read(rig: Rig, generation: int) -> None:
    session = rig.session(with_psam=False)
    assert await _code(session.read_basic()) == "NO_PSAM"
    step1 = await session.read_basic_hsm_step1()
    f = step1.split("|")
    assert len(f) == 9 and f[-1] == ""
    region, hist_hex, alg, card_id, int_in, int_plain, ext_in, ext_plain = f[:8]
    assert alg == ("03" if generation == 3 else "01")
    assert len(int_in) == len(int_plain) == 16
    # the HSM: the backend's root keys diversified down to this card
    a = Algorithm(int(alg, 16))
    factors = crypto.diversification_factors(region, bytes.fromhex(hist_hex))
    irk = crypto.derive(a, roots().get(a, "IRK"), factors)
    int_data = crypto.auth_data(a, irk, bytes.fromhex(int_in), bytes.fromhex(int_plain))
    ext = ""
    if generation == 3:
        assert len(ext_in) == len(ext_plain) == 16
        rk = crypto.derive(a, roots().get(a, "RKSSSE"), factors)
        ext = (crypto.auth_data(a, rk, bytes.fromhex(ext_in), bytes.fromhex(ext_plain)).hex()
               + ext_plain)
    else:
        assert ext_in == ext_plain == ""
    info = await session.read_basic_hsm_step2(f"{int_data.hex()}{int_plain}|{ext}|")
    assert info.name == "张三" and info.card_id.hex().upper() == card_id
    assert info.terminal_no == "000000000000"


async def test_hsm_step2_with_a_wrong_answer_is_card_not_genuine(rig: Rig) -> None:
    session = rig.session(with_psam=False)
    f = (await session.read_basic_hsm_step1()).split("|")
    bad = f"{'00' * 8}{f[5]}|{'00' * 8 + f[7] if f[6] else ''}|"
    tries_before = load_image(rig.card_image).keys["RKSSSE"].tries  # type: ignore[arg-type]
    assert await _code(session.read_basic_hsm_step2(bad)) == "CARD_NOT_GENUINE"
    # refused before the external authentication: no key try was spent
    assert load_image(rig.card_image).keys["RKSSSE"].tries == tries_before  # type: ignore[arg-type]
    assert await _code(session.read_basic_hsm_step2(bad)) == "INVALID_INPUT"  # no step 1 pending
    await session.read_basic_hsm_step1()
    assert await _code(session.read_basic_hsm_step2("zz|")) == "BAD_CALCULATION_DATA"


async def test_status(rig: Rig, generation: int) -> None:
    st = await rig.session(with_psam=False).status()
    assert st["present"] and st["sscard"] and st["generation"] == generation


# --- files ---------------------------------------------------------------------------------------


async def test_read_addresses(rig: Rig) -> None:
    s = rig.session()
    out = await s.read("SSSEEF05|07|05|$DF01EF0A|37|$", pin=GOOD, auth="pin")
    card_no = out.split("|")[1]
    assert out == f"SSSEEF05|{card_no}|20210601|$DF01EF0A|CHN|$"
    assert await s.read("DF04EF05|84|8C|$") == "DF04EF05|370202|11|$"  # RK1DF04 via the PSAM
    assert await s.read("DF04EF05|84|$", pin=GOOD, auth="pin") == "DF04EF05|370202|$"


async def test_read_needs_pin_or_key(rig: Rig) -> None:
    s = rig.session(with_psam=False)
    # PIN or RK1DF04, no PIN given, no PSAM for the key: the shortfall is named
    assert await _code(s.read("DF04EF05|84|$")) == "NO_PSAM"
    assert await _code(s.read("DF04EF08|$")) == "INVALID_INPUT"
    assert await _code(s.read("DF04EF05|84|$", pin="999999", auth="pin")) == "PIN_WRONG"


@pytest.mark.parametrize(
    "address",
    ["", "DF04EF05|84|", "XX01EF05|84|$", "DF04EF99|84|$", "DF04EF05|ZZ|$", "DF04EF05|$",
     "DF04EF05|55|$", "SSSEEF07|01|$", "DF04EF08|31|$", "DF04EF05|84:0|$", "A" * 2000 + "$"],
)
async def test_bad_addresses(rig: Rig, address: str) -> None:
    assert await _code(rig.session().read(address, pin=GOOD)) == "BAD_PARAMETER"


async def test_write_through_the_psam(rig: Rig) -> None:
    s = rig.session()
    assert await s.write("DF04EF05|84|$", "370203|$") == "DF04EF05|370203|$"
    assert await s.read("DF04EF05|84|$") == "DF04EF05|370203|$"
    assert await _code(s.write("DF04EF05|84|$", "37020X|$")) == "INVALID_INPUT"
    assert await _code(s.write("DF04EF05|84|8C|$", "370203|$")) == "BAD_PARAMETER"


async def test_record_settlement_on_the_chip(rig: Rig) -> None:
    s = rig.session()
    for seq in (1, 2):
        rec = TxnRecord(seq, "370212000001", "20261125103000", 1250, 100, 1000)
        assert await s.record_settlement(rec) is True
    out = await s.read("DF04EF08|1|2|$", pin=GOOD, auth="pin")
    assert out == ("DF04EF08|2^2^370212000001^20261125103000^12.50^1.00^10.00^|"
                   "1^2^370212000001^20261125103000^12.50^1.00^10.00^|$")


# --- PIN -----------------------------------------------------------------------------------------


async def test_verify_pin_rules(rig: Rig) -> None:
    s = rig.session()
    await s.verify_pin(GOOD)
    with pytest.raises(SSCardError) as ei:
        await s.verify_pin("999999")
    assert ei.value.code == "PIN_WRONG" and ei.value.details["tries_left"] == 2
    assert ei.value.compat_code == -51 and "2" in ei.value.message
    assert await _code(s.verify_pin("12")) == "PIN_LENGTH"
    assert await _code(s.verify_pin("12ab56")) == "PIN_LENGTH"
    await s.verify_pin(GOOD)  # resets the counter
    for _ in range(2):
        await _code(s.verify_pin("999999"))
    assert await _code(s.verify_pin("999999")) == "PIN_BLOCKED"
    assert await _code(s.verify_pin(GOOD)) == "PIN_BLOCKED"


async def test_initial_pin_verifies_but_cannot_transact(tmp_path: Path) -> None:
    rig = emulated_rig(tmp_path, 3, pin=INITIAL)
    try:
        s = rig.session()
        err = await _code(s.verify_pin(INITIAL))
        assert err == "PIN_INITIAL"
        assert load_image(rig.card_image).pin.tries == 3  # type: ignore[arg-type]
        assert await _code(s.change_pin(INITIAL, INITIAL, INITIAL)) == "PIN_TO_INITIAL"
        assert await _code(s.change_pin(INITIAL, "112233", "112234")) == "PIN_MISMATCH"
        await s.change_pin(INITIAL, "112233", "112233")
        await s.verify_pin("112233")
    finally:
        await rig.close()


async def test_pin_state_does_not_carry_over(rig: Rig) -> None:
    """After an operation that verified the PIN the card is reset: the chip itself says the PIN
    is no longer verified (VERIFY query 00 20 00 00 answers 63Cx, not 9000)."""
    from sscardd.transport import Exchanger

    def query(link: object) -> int:
        ex = Exchanger(link)  # type: ignore[arg-type]
        ex.send(bytes.fromhex("00A404000F7378312E73682EC9E7BBE1B1A3D5CF"))
        return ex.send(bytes.fromhex("00200000")).sw

    s = rig.session(with_psam=False)
    await s.verify_pin(GOOD)
    assert await rig.card_reader.run(query) == 0x63C3
    await s.read("DF04EF05|84|$", pin=GOOD, auth="pin")
    assert await rig.card_reader.run(query) == 0x63C3
    if rig.keypad is not None:
        rig.type_keys(GOOD)
        await s.verify_pin()
        assert await rig.card_reader.run(query) == 0x63C3


async def test_keypad_pin_for_a_protected_read(rig: Rig) -> None:
    if rig.keypad is None:
        pytest.skip(f"{rig.kind} has no keypad")
    rig.type_keys(GOOD)
    out = await rig.session(with_psam=False).read("DF04EF08|$", auth="pin")
    assert out == "DF04EF08|$"  # no records yet, but the PIN-protected file was read


async def test_change_pin(rig: Rig) -> None:
    s = rig.session()
    assert await _code(s.change_pin("999999", "135790", "135790")) == "PIN_WRONG"
    await s.change_pin(GOOD, "135790", "135790")
    assert await _code(s.verify_pin(GOOD)) == "PIN_WRONG"
    await s.verify_pin("135790")
    assert await _code(s.change_pin(GOOD, None, None)) == "INVALID_INPUT"


async def test_keypad_pin(rig: Rig) -> None:
    if rig.keypad is None:
        pytest.skip(f"{rig.kind} has no keypad")
    s = rig.session()
    rig.type_keys(GOOD)
    await s.verify_pin()
    rig.type_keys("999999")
    assert await _code(s.verify_pin()) == "PIN_WRONG"
    rig.type_keys(None)
    assert await _code(s.verify_pin()) == "PIN_CANCELLED"
    assert await _code(s.verify_pin()) == "PIN_TIMEOUT"  # nobody types
    rig.type_keys("12")
    assert await _code(s.verify_pin()) == "PIN_LENGTH"
    rig.type_keys(GOOD, "112233", "112234")
    assert await _code(s.change_pin()) == "PIN_MISMATCH"
    rig.type_keys(GOOD, INITIAL, INITIAL)
    assert await _code(s.change_pin()) == "PIN_TO_INITIAL"
    rig.type_keys(GOOD, INITIAL.replace("1", "7"), INITIAL.replace("1", "7"))
    await s.change_pin()
    rig.type_keys("723456")
    await s.verify_pin()


# --- faults --------------------------------------------------------------------------------------


async def _count_apdus(rig: Rig) -> int:
    reader = rig.card_reader
    before = reader.apdus  # type: ignore[attr-defined]
    await rig.session().read_basic()
    return int(reader.apdus) - before  # type: ignore[attr-defined]


async def test_card_pulled_between_any_two_apdus(tmp_path: Path, generation: int) -> None:
    rig = emulated_rig(tmp_path, generation)
    try:
        n = await _count_apdus(rig)
        assert n >= 15
        for k in range(n):
            rig.card_reader.pull_card_after(k)  # type: ignore[attr-defined]
            assert await _code(rig.session().read_basic()) == "CARD_REMOVED", k
            assert await _code(rig.session().read_basic()) == "NO_CARD"
            rig.card_reader.insert()  # type: ignore[attr-defined]
            info = await rig.session().read_basic()
            assert info.name == "张三"
    finally:
        await rig.close()


async def test_foreign_card_is_not_sscard(tmp_path: Path) -> None:
    class Iso7816Card:  # answers like vicc's plain ISO card: no SSSE
        atr = bytes.fromhex("3B8880010000000000718100F9")

        def power_on(self) -> None: ...
        def power_off(self) -> None: ...
        def reset(self) -> None: ...

        def execute(self, apdu: bytes) -> bytes:
            return b"\x6a\x82" if apdu[1] == 0xA4 else b"\x6d\x00"

    async with card_with_genuine_psam(tmp_path, Iso7816Card()) as s:
        assert await _code(s.read_basic()) == "NOT_SSCARD"
        assert (await s.status())["sscard"] is False


async def test_no_card_then_a_card(rig: Rig) -> None:
    rig.remove_card()
    assert await _code(rig.session().read_basic()) == "NO_CARD"
    assert (await rig.session().status()) == {"present": False}
    rig.insert_card()
    assert (await rig.session().read_basic()).name == "张三"


async def test_card_from_other_keys_is_not_genuine(tmp_path: Path) -> None:
    async with card_with_genuine_psam(tmp_path, card_from_other_keys()) as s:
        assert await _code(s.read_basic()) == "CARD_NOT_GENUINE"


async def test_terminal_psam_lacks_puk_rights(rig: Rig) -> None:
    from sscardd.psam import CardRef

    psam = rig.session().psam
    assert psam is not None
    ref = CardRef(Algorithm.SM4, "370202", historical_bytes(bytes.fromhex(
        "3B6D000000814A44468660370212345678")))
    with pytest.raises(SSCardError) as ei:
        await asyncio.to_thread(psam.auth_cryptogram, ref, "PUK", bytes(8), bytes(8))
    assert ei.value.code == "PSAM_KEY_LEVEL" and ei.value.compat_code == -24


async def test_write_names_the_first_record_only(rig: Rig) -> None:
    assert await _code(rig.session().write("DF04EF05|84:2|$", "370203|$")) == "BAD_PARAMETER"


async def test_wrong_card_never_burns_key_tries(tmp_path: Path) -> None:
    """A card from other keys fails INTERNAL AUTHENTICATE before any EXTERNAL AUTHENTICATE:
    its RK1DF04/UK1DF04 counters stay as they were, however often it is tried."""
    fake = card_from_other_keys()
    async with card_with_genuine_psam(tmp_path, fake) as s:
        for _ in range(5):
            assert await _code(s.read("DF04EF05|84|$")) == "CARD_NOT_GENUINE"
            assert await _code(s.write("DF04EF05|84|$", "370203|$")) == "CARD_NOT_GENUINE"
    assert {k: fake.image.keys[k].tries for k in ("RK1DF04", "UK1DF04", "RKSSSE")} == {
        "RK1DF04": 3, "UK1DF04": 3, "RKSSSE": 3}


async def test_keypad_reader_claiming_success_with_a_failing_sw_is_not_believed(tmp_path: Path) -> None:
    rig = emulated_rig(tmp_path, 3)
    try:
        reader = rig.card_reader
        reader.firmware.verify = lambda execute: (0x00, 0x63C2)  # type: ignore[attr-defined]
        assert await _code(rig.session().verify_pin()) == "PIN_WRONG"
    finally:
        await rig.close()


async def test_compat_fields_cannot_be_shifted_by_card_data(tmp_path: Path) -> None:
    card = SocialSecurityCard(issue_card(CardParams(holder=Holder(name="张|三")), roots()))
    async with card_with_genuine_psam(tmp_path, card) as s:
        assert await _code(s.read_basic()) == "CARD_GARBAGE"
