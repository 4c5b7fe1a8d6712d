"""What an ``sscardd run`` process writes — its real stdout and stderr at DEBUG (APDU traces
included), and its journal file — holds no PIN, PIN block, password, full ID number or name,
whatever passed through it: POS sales with PIN blocks, a wrong PIN, kiosk calls with clear PINs,
an activation with the portal password."""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import uuid
from pathlib import Path

from sscardd import broker
from tests.backend_lab import request_properties
from tests.daemon_lab import GOOD, ZHANG, A, DaemonProcess, SettleLab, config_text, issue_images, pin_block
from tests.e2e.test_kiosk_daemon import client
from tests.e2e.test_settlement import SMALL, sale
from tests.e2e.test_settlement_faults import lab  # noqa: F401 - the fixture

WRONG = "111111"
NEW = "135790"
PASSWORD = "Zhang2024pw"


async def test_no_secret_or_holder_data_in_the_process_output_or_journal(lab: SettleLab) -> None:  # noqa: F811
    sockdir = Path(tempfile.mkdtemp(prefix="sscardd-red-", dir="/tmp"))
    work = lab.workdir / "red"
    work.mkdir()
    card, psam = issue_images(work, ZHANG, terminal_id=A)
    sock = sockdir / "kiosk.sock"
    text = config_text(lab, A, work, card=f"emulated:{card}", psam=f"emulated:{psam}")
    text = text.replace("[kiosk]\nenabled = false\n", f'[logging]\nlevel = "DEBUG"\njson = true\n'
                                                      f'[kiosk]\nenabled = true\nsocket = "{sock}"\n')
    cfg = work / "sscardd.toml"
    cfg.write_text(text)
    daemon = DaemonProcess(cfg)
    blocks = [pin_block(GOOD, ZHANG.ssn)["block"], pin_block(WRONG, ZHANG.ssn)["block"]]
    try:
        daemon.start()
        await asyncio.to_thread(daemon.wait_log, "broker connected")
        reply_topic = f"sscard/v1/term/{A}/reply/red"
        async with lab.mosq.client(broker.pos_username(A)) as pos:
            await pos.subscribe(reply_topic, qos=1)
            for pin in ({"source": "block", "block": blocks[1]}, {"source": "block", "block": blocks[0]}):
                body = json.dumps({"id": uuid.uuid4().hex[:10], "op": "sale", "args": sale(pin, SMALL)})
                await pos.publish(broker.cmd_topic(A), body.encode(), qos=1,
                                  properties=request_properties(reply_topic, uuid.uuid4().bytes))
                async with asyncio.timeout(20):
                    await anext(pos.messages)
        async with client(sock) as c:
            await c.call("card.read_basic")
            await c.call("pin.verify", {"pin": WRONG})
            await c.call("pin.change", {"old": GOOD, "new": NEW, "new_again": NEW})
            await c.call("records.list", {"pin": NEW})
            await c.call("card.activate", {"certno": ZHANG.ssn, "password": PASSWORD})
            await c.call("no.such.method", {"pin": NEW, "certno": ZHANG.ssn})
        assert daemon.stop() == 0
    finally:
        daemon.stop()
        shutil.rmtree(sockdir, ignore_errors=True)
    out = daemon.log_text()
    assert '"level": "debug"' in out and '"apdu"' in out  # it did log at DEBUG, APDU traces too
    journal = b"".join(p.read_bytes() for p in lab.workdir.glob(f"journal-{A}.sqlite3*"))
    secrets = [GOOD, WRONG, NEW, PASSWORD, ZHANG.ssn, ZHANG.name, *blocks]
    for s in secrets:
        assert s not in out, f"{s!r} in the daemon's output"
        assert s.encode() not in journal and s.encode("utf-8") not in journal, f"{s!r} in the journal"
    # the PINs as they travel in a VERIFY/CHANGE body (BCD, hex in an APDU trace)
    for pin in (GOOD, WRONG, NEW):
        assert pin not in out.replace(" ", "")
