"""The daemon on the PC/SC path: card and PSAM served into real pcscd through vpcd, found by the
daemon itself, reader events on MQTT, and a chip record owed to a pulled card written when the
card comes back."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from firmware_sim.lab import VPCD_READERS, wait_card_state
from sscardd import broker
from sscardd.journal import State
from tests.daemon_lab import GOOD, ZHANG, A, SettleLab, pin_block, running_lab
from tests.e2e.emulator import served_in_pcscd
from tests.e2e.test_settlement import SMALL, eventually, last_row, row_state, sale
from tests.mqtt_harness import MosquittoFactory

pytestmark = [pytest.mark.mosquitto, pytest.mark.usefixtures("pcscd")]


@pytest.fixture(scope="module")
def lab(mosquitto_factory: MosquittoFactory, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SettleLab]:
    with running_lab(mosquitto_factory, tmp_path_factory.mktemp("settle-pcsc")) as lab:
        yield lab


async def next_event(client: Any, kind: str, timeout: float = 10.0) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        async for msg in client.messages:
            doc = json.loads(msg.payload)
            if doc.get("event") == kind:
                return dict(doc)
    raise AssertionError("message stream ended")


async def test_sale_through_pcscd_with_events_and_a_chip_record_owed(lab: SettleLab, tmp_path: Path) -> None:
    async with lab.terminal(A, ZHANG, pcsc=True, start=False, monitor=True) as t:
        card_image, psam_image = t.images
        with served_in_pcscd(card_image, psam=psam_image, log=tmp_path / "serve.log") as emu:
            async with lab.mosq.client(broker.pos_username(A)) as watcher:
                await watcher.subscribe(broker.events_topic(A), qos=1)
                await t.start()
                assert t.daemon is not None and t.daemon.psam_state.state == "ok"
                assert t.daemon.psam_state.reader == VPCD_READERS[1]
                # at start every card present is reported
                first = await next_event(watcher, "card_inserted")
                assert first["reader"] in VPCD_READERS and ZHANG.card_no not in json.dumps(first)

                r = await t.request("sale", sale(pin_block(GOOD, ZHANG.ssn), SMALL))
                assert r["ok"] and r["result"]["chip_record"] == "written", r

                # The card is pulled after the backend booked the sale, before the chip write.
                lab.faults.arm("hold_answer", infno="2102", terminal_id=A)
                task = asyncio.create_task(t.request("sale", sale(pin_block(GOOD, ZHANG.ssn), SMALL)))
                await asyncio.to_thread(lab.faults.wait_held, infno="2102")
                emu.send_signal(signal.SIGUSR1)  # remove the card (the PSAM stays)
                assert await asyncio.to_thread(wait_card_state, VPCD_READERS[0], False)
                removed = await next_event(watcher, "card_removed")
                assert removed["reader"] == VPCD_READERS[0]
                lab.faults.release(infno="2102")
                r2 = await task
                assert r2["ok"] and r2["result"]["chip_record"] == "pending", r2
                row = last_row(t)
                assert row.state == State.SETTLED and row.chip_record == "pending"

                emu.send_signal(signal.SIGUSR2)  # the card comes back
                await next_event(watcher, "card_inserted")
                written = await eventually(lambda: asyncio.to_thread(t.journal.get, row.id),
                                           lambda e: e.chip_record == "written")
                assert written.state == State.SETTLED
                assert await row_state(t, row.id) == State.SETTLED
            await t.stop_daemon()
