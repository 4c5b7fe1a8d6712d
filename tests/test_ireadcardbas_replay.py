"""Replay the card-spec §3.4 ``iReadCardBas`` APDU sequence against the emulated card and PSAM.

The sequence is the sanitised real trace: select SSSE, read EF05 records by identifier, internal
authentication checked through the PSAM, on 3.0 cards external authentication with RKSSSE
computed by the PSAM, then EF05 dates and the EF06 holder records.
"""

from __future__ import annotations

import pytest

from apdu_specs import filesystem, tlv
from apdu_specs.crypto import Algorithm
from apdu_specs.identifiers import historical_bytes
from firmware_sim.cos import ResponseMode
from firmware_sim.sscard import SocialSecurityCard
from tests.emu import SELECT_SSSE, new_card, new_psam, psam_card_auth, tx


def _value(rec: bytes) -> bytes:
    return tlv.decode_record(rec)[1]


def ok(card: SocialSecurityCard, apdu: str) -> bytes:
    """Send as a terminal does: follow 61xx with GET RESPONSE (T=0 cards), expect 9000."""
    r = tx(card, apdu)
    data = r.data
    while r.sw >> 8 == 0x61:
        r = tx(card, f"00C00000{r.sw & 0xFF:02X}")
        data += r.data
    assert r.sw == 0x9000, f"{apdu} -> {r.sw:04X}"
    return data


def read_card_bas(card: SocialSecurityCard) -> str:
    psam = new_psam()
    card.power_on()
    fci = filesystem.parse_fci(ok(card, SELECT_SSSE))
    alg = Algorithm(fci.algorithm or 1)
    ok(card, "00A4020002EF05")
    card_id = _value(ok(card, "00B2010012"))
    version = _value(ok(card, "00B2030006")).rstrip(b"\0").decode()
    card_no = _value(ok(card, "00B207000B")).decode()
    # card authentication: R2 is the session input, R1 the plain data
    r1 = ok(card, "0084000008")
    r2 = ok(card, "0084000008")
    answer = ok(card, "0088000010" + (r2 + r1).hex())
    assert psam_card_auth(psam, card, "IRK", r2, r1) == answer, "card not genuine"
    if version.startswith("3"):
        r3 = ok(card, "0084000008")
        r4 = ok(card, "0084000008")
        auth = psam_card_auth(psam, card, "RKSSSE", r4, r3)
        assert tx(card, "0082000A10" + (auth + r3).hex()).sw == 0x9000
    ok(card, "00A4020002EF05")
    issue = filesystem.SSSE_EF05.item(0x05).decode_record(ok(card, "00B2050006"))
    expiry = filesystem.SSSE_EF05.item(0x06).decode_record(ok(card, "00B2060006"))
    ok(card, "00A4020002EF06")
    ssn = _value(ok(card, "00B2080014")).decode()
    name = filesystem.SSSE_EF06_ITEMS[1].decode_record(ok(card, "00B2090020"))
    name += filesystem.SSSE_EF06_ITEMS[2].decode_record(ok(card, "00B24E0016"))
    ok(psam, "00A40000023F00")
    terminal = ok(psam, "00B0960006").hex()
    assert alg in (Algorithm.DES3, Algorithm.SM4)
    fields = [card_id[:3].hex(), ssn, card_no, card_id.hex().upper(), name,
              historical_bytes(card.atr).hex().upper(), version, issue, expiry, terminal, ""]
    return "|".join(fields) + "|"


@pytest.mark.parametrize("generation", [2, 3])
@pytest.mark.parametrize("mode", [ResponseMode.DIRECT, ResponseMode.T0], ids=["direct", "t0"])
def test_ireadcardbas_sequence(generation: int, mode: ResponseMode) -> None:
    # The whole trace in both modes: a T=0 card answers the case-4 commands (SELECT by name,
    # INTERNAL AUTHENTICATE) with 61xx, fetched with GET RESPONSE.
    card = new_card(generation, mode)
    if mode is ResponseMode.T0:
        assert tx(card, SELECT_SSSE).sw == 0x611E
    out = read_card_bas(card)
    card_id = card.image.files["SSSE/EF05"].records[0][2:].hex().upper()  # type: ignore[index]
    hist = historical_bytes(card.atr).hex().upper()
    version = "3.00" if generation == 3 else "2.00"
    assert out == (f"370202|370202199001011237|{card.image.meta['card_no']}|{card_id}|张三|{hist}|"
                   f"{version}|20210601|20310601|370212000001||")
    assert len(out.split("|")) == 12  # 11 fields, each terminated by "|"


def test_wrong_psam_keys_make_the_card_look_fake() -> None:
    """A card personalised under other root keys fails the PSAM check (CARD_NOT_GENUINE)."""
    from apdu_specs import keyfile
    from firmware_sim.personalise import CardParams, issue_card

    keys = {alg: dict.fromkeys(filesystem.all_key_names(), bytes(16))
            for alg in (Algorithm.DES3, Algorithm.SM4)}
    fake = SocialSecurityCard(issue_card(CardParams(generation=3), keyfile.RootKeys("test", keys)))
    with pytest.raises(AssertionError, match="card not genuine"):
        read_card_bas(fake)
