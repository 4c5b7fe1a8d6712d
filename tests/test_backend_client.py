"""The daemon's side of the backend contract: message ids, envelopes, strict answer reading."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backend_sim.envelope import BEIJING
from sscardd import backend as B
from sscardd.config import InstitutionConfig

INST = InstitutionConfig(code="P37021200001", name="崂山康泰大药房", type="pharmacy", region="370212")
AT = datetime(2026, 11, 25, 10, 30, 0, tzinfo=BEIJING)


def answer(**over: Any) -> bytes:
    doc: dict[str, Any] = {"infcode": 0, "inf_refmsgid": "SIMBKD1", "msgid": "m1", "infno": "2102",
                           "err_code": None, "err_msg": None, "final": True, "output": {"x": 1}}
    doc.update(over)
    return json.dumps(doc).encode()


def test_msgid_national_form_and_kinds() -> None:
    ids = {B.msgid(INST.code, k, 7, AT) for k in (B.KIND_PRESETTLE, B.KIND_SETTLE, B.KIND_REVERSAL)}
    assert len(ids) == 3
    for m in ids:
        assert len(m) == 30 and m.startswith("P3702120000120261125103000") and m[-4:].isdigit()
    # rows 2500 apart in the same second collide; that takes 2500 rows in one second
    assert B.msgid(INST.code, B.KIND_SETTLE, 1, AT) != B.msgid(INST.code, B.KIND_SETTLE, 2, AT)
    assert B.msgid(INST.code, B.KIND_SETTLE, 1, AT) == B.msgid(INST.code, B.KIND_SETTLE, 2501, AT)
    with pytest.raises(ValueError):
        B.msgid(INST.code, B.KIND_OTHER, 3)
    with pytest.raises(ValueError):
        B.msgid(INST.code, B.KIND_SETTLE)
    other = B.msgid(INST.code, B.KIND_OTHER, at=AT)
    assert int(other[-4:]) % 4 == 3


def test_envelope_states_its_expiry_and_institution() -> None:
    doc = json.loads(B.envelope("2101", "m1", {"a": 1}, institution=INST, expiry_s=10, opter="0001", at=AT))
    assert doc["inf_time"] == "2026-11-25 10:30:00" and doc["exp_time"] == "2026-11-25 10:30:10"
    assert doc["fixmedins_code"] == INST.code and doc["mdtrtarea_admvs"] == "370212"
    assert doc["input"] == {"a": 1} and doc["opter"] == "0001"


def test_answers_are_read_strictly() -> None:
    a = B.parse_answer(answer(), msg_id="m1", infno="2102")
    assert a.ok and a.final and a.output == {"x": 1}
    refusal = B.parse_answer(answer(infcode=-1, err_code="NON_MEDICAL_ITEM", err_msg="x / y",
                                    output={"lines": [{"feedetl_sn": "2"}]}), msg_id="m1", infno="2102")
    err = refusal.error()
    assert err.code == "NON_MEDICAL_ITEM" and err.details["lines"] == [{"feedetl_sn": "2"}]
    other = B.parse_answer(answer(infcode=-1, err_code="PIN_NOT_VERIFIED"), msg_id="m1", infno="2102")
    assert other.error().code == "BACKEND_REFUSED"
    assert other.error().details["backend_code"] == "PIN_NOT_VERIFIED"


@pytest.mark.parametrize("payload", [
    b"\xff", b"[]", b"null", answer(msgid="m2"), answer(infno="2101"), answer(infcode=1),
    answer(infcode=True), answer(final="yes"), answer(output=[1]), answer(err_code=5), answer(final=False),
])
def test_garbage_answers(payload: bytes) -> None:
    with pytest.raises(B.BackendGarbage):
        B.parse_answer(payload, msg_id="m1", infno="2102")


def test_a_refusal_that_is_not_final_is_read_as_such() -> None:
    a = B.parse_answer(answer(infcode=-1, err_code="INJECTED_FAILURE", final=False), msg_id="m1",
                       infno="2102")
    assert not a.ok and not a.final


@given(st.one_of(st.none(), st.integers(), st.floats(allow_nan=True), st.text(max_size=20)))
def test_money_fields_must_be_two_decimal_strings(v: Any) -> None:
    obj = {"amt": v}
    if isinstance(v, str) and B._MONEY.fullmatch(v):
        assert B.fen(obj, "amt") >= 0
    else:
        with pytest.raises(B.BackendGarbage):
            B.fen(obj, "amt")
