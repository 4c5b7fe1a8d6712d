"""The sale cryptogram: the emulated card's INTERNAL AUTHENTICATE matches the backend's check."""

from __future__ import annotations

import pytest

from apdu_specs import sale_auth
from apdu_specs.crypto import Algorithm
from apdu_specs.identifiers import historical_bytes
from tests.emu import SELECT_SSSE, new_card, ok, roots


@pytest.mark.parametrize("generation", [2, 3])
def test_card_answer_matches_backend_check(generation: int) -> None:
    card = new_card(generation)
    ok(card, SELECT_SSSE)
    t = "370212000001"
    si, plain = sale_auth.sale_challenge("370212000001202611251030000001", "12.50", t)
    answer = ok(card, "0088000010" + (si + plain).hex())
    alg = Algorithm.SM4 if generation == 3 else Algorithm.DES3
    args = (alg, roots().get(alg, "IRK"), card.image.region, historical_bytes(card.atr))
    assert sale_auth.check_cryptogram(*args, "370212000001202611251030000001", "12.50", t, answer)
    assert not sale_auth.check_cryptogram(*args, "370212000001202611251030000001", "12.51", t, answer)
    assert not sale_auth.check_cryptogram(*args, "370212000001202611251030000002", "12.50", t, answer)
    # the same sale replayed by another terminal does not verify
    assert not sale_auth.check_cryptogram(*args, "370212000001202611251030000001", "12.50",
                                          "370212000002", answer)


@pytest.mark.parametrize(("msgid", "total"), [("", "1.00"), ("x" * 65, "1.00"), ("m", "1"),
                                                ("m", "1.5"), ("m", "-1.00"), ("m", "01.00")])
def test_bad_inputs(msgid: str, total: str) -> None:
    with pytest.raises(ValueError):
        sale_auth.sale_challenge(msgid, total, "370212000001")
