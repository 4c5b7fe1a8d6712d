"""Redaction on every log path: structlog, standard-library loggers, tracebacks, APDU traces."""

from __future__ import annotations

import io
import json
import logging

import structlog

from sscardd import log
from sscardd.errors import KINDS, SSCardError

SSN = "370202199001011237"


def _configured() -> io.StringIO:
    buf = io.StringIO()
    log.configure("DEBUG", json=True, stream=buf)
    return buf


def test_structlog_fields_are_redacted() -> None:
    buf = _configured()
    structlog.get_logger("t").info("verify", pin="246810", pin_block="AB" * 16, ssn=SSN,
                                   name="张三", password="secret1", note=f"id {SSN} seen")
    line = json.loads(buf.getvalue().splitlines()[-1])
    assert line["pin"] == line["pin_block"] == line["password"] == "***"
    assert line["ssn"] == "3702**********1237"
    assert line["name"] == "张*"
    assert line["note"] == "id 3702**********1237 seen"
    assert "246810" not in buf.getvalue() and SSN not in buf.getvalue()


def test_standard_library_loggers_go_through_the_same_chain() -> None:
    buf = _configured()
    logging.getLogger("some.dependency").warning("looked up %s", SSN)
    assert SSN not in buf.getvalue()
    assert "3702**********1237" in buf.getvalue()


def test_tracebacks_are_masked() -> None:
    buf = _configured()
    try:
        raise ValueError(f"bad record for {SSN}")
    except ValueError:
        structlog.get_logger("t").exception("failed")
        logging.getLogger("dep").exception("failed too")
    assert SSN not in buf.getvalue()
    assert buf.getvalue().count("3702**********1237") >= 2


def test_apdu_trace_redacts_pin_bodies_and_response_data() -> None:
    buf = _configured()
    log.apdu_trace("card", bytes.fromhex("0020000003246810"), bytes.fromhex("63C2"))
    log.apdu_trace("card", bytes.fromhex("805E010007246810FF135790"), bytes.fromhex("9000"))
    log.apdu_trace("card", bytes.fromhex("842400011412345678"), bytes.fromhex("9000"))
    name_record = bytes.fromhex("091ED5C5C8FD" + "00" * 26 + "9000")
    log.apdu_trace("card", bytes.fromhex("00B2090020"), name_record)
    out = buf.getvalue()
    assert "246810" not in out and "135790" not in out
    assert "D5C5C8FD" not in out.upper()
    assert '"c": "0020000003 <3 bytes redacted>"' in out
    assert '"r": "<32 bytes> 9000"' in out


def test_error_messages_are_fixed_texts_not_echoes() -> None:
    """Every kind renders, and a message never includes what the caller put in ``detail``
    (the place a careless caller might pass a PIN or an ID number)."""
    for code in KINDS:
        details = {"sw": 0x63C2} if code == "CARD_STATUS" else {}
        err = SSCardError(code, f"pin 246810 for {SSN}", **details)
        d = err.to_dict()
        assert isinstance(d["compat_code"], int) and d["message"] and d["message_zh"]
        assert "246810" not in json.dumps(d, ensure_ascii=False) and SSN not in json.dumps(d)
    err = SSCardError("PIN_WRONG", tries_left=2)
    assert err.compat_code == -51 and "2 tries" in err.message and "2次" in err.message_zh
    assert SSCardError("CARD_STATUS", sw=0x6A82).compat_code == -27266


def test_capture_logs_sees_redacted_values() -> None:
    with structlog.testing.capture_logs(processors=[log.redact]) as logs:
        structlog.get_logger().info("x", new_pin="1357", ssn=SSN)
    assert logs[0]["new_pin"] == "***" and logs[0]["ssn"] == "3702**********1237"
