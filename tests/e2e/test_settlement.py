"""Settlement end to end: POS → daemon (in-process, emulated card and PSAM) → real mosquitto
(TLS, provisioned dynamic security) → backend simulator processes on one ledger."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.daemon_lab import A, GOOD, ZHANG, SettleLab, lab_for, pin_block
from tests.mqtt_harness import MosquittoFactory

pytestmark = pytest.mark.mosquitto

SALE_ITEMS = [{"code": "A0001", "qty": 2, "price": "12.50"}, {"code": "B0001", "qty": 1, "price": "30.00"},
              {"code": "C0001", "qty": 1, "price": "8.00"}]
OPERATOR = {"id": "0001", "name": "王药师"}


@pytest.fixture(scope="module")
def lab(mosquitto_factory: MosquittoFactory, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SettleLab]:
    lab = lab_for(mosquitto_factory, tmp_path_factory.mktemp("settle"))
    lab.start_backend("b1", reset=True)
    try:
        yield lab
    finally:
        lab.stop()
        lab.mosq.stop()


async def test_pharmacy_sale(lab: SettleLab) -> None:
    async with lab.terminal(A, ZHANG) as t:
        before = lab.balance(ZHANG.ssn)
        r = await t.request("sale", {"operator": OPERATOR, "items": SALE_ITEMS, "pin": pin_block(GOOD, ZHANG.ssn)})
        assert r["ok"], r
        res = r["result"]
        assert res["medfee_sumamt"] == "63.00" and res["chip_record"] == "written", res
        print(res, before, lab.balance(ZHANG.ssn))
