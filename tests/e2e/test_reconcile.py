"""``sscardd reconcile`` end to end: a real mosquitto configured as shipped (TLS, dynamic security),
the backend simulator as a process with the example seed and a fresh ledger per test, settlements
booked through real 2102/2103/2601 requests, and a journal holding the matching rows.

The command logs in with terminal A's daemon credentials under the client id ``{A}-cli``: a
daemon connected meanwhile under its own client id keeps its connection and its session, and sees
none of the command's answers.
"""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from sscardd import broker
from sscardd.config import Config, load
from sscardd.journal import Amounts, Journal
from sscardd.mqtt import DaemonLink, LateAnswer
from sscardd.reconcile import reconcile
from tests.backend_helpers import EXAMPLE_SEED, PHARMACY, PHARMACY_2, ZHANG, LiveClock, Requests
from tests.backend_lab import BackendProcess, HarnessBroker, Terminal
from tests.mqtt_harness import BACKEND, TERMINAL_A, TERMINAL_B, Mosquitto
from tests.test_reconcile import (
    SALE,
    SMALL,
    amounts_of,
    journal_open,
    journal_sale,
    journal_void,
    write_config,
)

A = TERMINAL_A
assert (PHARMACY[0], PHARMACY_2[0]) == (TERMINAL_A, TERMINAL_B)
DA = broker.daemon_username(A)
WAIT = 10.0


def sscardd_command() -> list[str]:
    script = Path(sys.executable).parent / "sscardd"
    return [str(script)] if script.exists() else [sys.executable, "-m", "sscardd.cli"]


@pytest.fixture
def harness(mqtt_broker: Mosquitto) -> HarnessBroker:
    return HarnessBroker(mqtt_broker, BACKEND, broker.daemon_username)


@pytest.fixture
def backend(harness: HarnessBroker, tmp_path: Path) -> Iterator[BackendProcess]:
    proc = BackendProcess(tmp_path, harness, tmp_path / "ledger.sqlite", EXAMPLE_SEED,
                          f"rec-{uuid.uuid4().hex[:8]}")
    try:
        proc.start()
        yield proc
    finally:
        proc.stop()
    assert "Traceback" not in proc.log_text()


@pytest.fixture
def cfg_path(tmp_path: Path, mqtt_broker: Mosquitto) -> Path:
    pw = tmp_path / "mqtt-password"
    pw.write_text(mqtt_broker.passwords[DA] + "\n")
    pw.chmod(0o600)
    return write_config(tmp_path, mqtt={"port": mqtt_broker.port, "username": DA, "password_file": pw,
                                        "tls": {"enabled": True, "ca": mqtt_broker.ca.ca_cert}})


@pytest.fixture
def cfg(cfg_path: Path) -> Config:
    return load(cfg_path)


@pytest.fixture
def journal(cfg: Config) -> Iterator[Journal]:
    j = Journal.from_config(cfg.journal, cfg.reversal)
    try:
        yield j
    finally:
        j.close()


class Tills:
    """Terminals A and B of the pharmacy, booking through the broker and the backend process."""

    def __init__(self, harness: HarnessBroker) -> None:
        self.a = Terminal(harness, A)
        self.b = Terminal(harness, TERMINAL_B)
        self.n = 0

    def msgid(self) -> str:
        self.n += 1
        return f"E{uuid.uuid4().hex[:16]}{self.n:04d}"

    async def ask(self, doc: dict[str, Any], term: Terminal) -> dict[str, Any]:
        ans, _ = await term.request(doc)
        assert ans["infcode"] == 0, ans
        return ans

    async def sale(self, items: list[tuple[str, int, str]] = SALE) -> tuple[str, dict[str, Any]]:
        msgid = self.msgid()
        ans = await self.ask(Requests(LiveClock()).sale("2102", items, ZHANG, msgid=msgid), self.a)
        return msgid, ans["output"]["setlinfo"]

    async def void(self, setl_id: str, *, other_terminal: bool = False) -> str:
        msgid = self.msgid()
        req = Requests(LiveClock(), PHARMACY_2 if other_terminal else PHARMACY)
        await self.ask(req.envelope("2103", {"setl_id": setl_id}, msgid=msgid),
                       self.b if other_terminal else self.a)
        return msgid

    async def reverse(self, omsgid: str) -> None:
        doc = Requests(LiveClock()).envelope("2601", {"omsgid": omsgid, "oinfno": "2102"}, msgid=self.msgid())
        assert (await self.ask(doc, self.a))["output"]["result"] == "reversed"


@pytest.fixture
async def tills(harness: HarnessBroker, backend: BackendProcess) -> AsyncIterator[Tills]:
    t = Tills(harness)
    async with t.a, t.b:
        yield t


async def run_cli(*args: str) -> tuple[int, str, str]:
    pipe = asyncio.subprocess.PIPE
    proc = await asyncio.create_subprocess_exec(*sscardd_command(), "reconcile", *args,
                                                stdout=pipe, stderr=pipe)
    try:
        async with asyncio.timeout(30):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_agreement_through_the_cli_beside_the_daemon(cfg: Config, cfg_path: Path, journal: Journal,
                                                           tills: Tills, mqtt_broker: Mosquitto) -> None:
    m1, s1 = await tills.sale()
    m2, s2 = await tills.sale(SMALL)
    m3, s3 = await tills.sale(SMALL)
    v3 = await tills.void(s3["setl_id"])
    m4, _ = await tills.sale(SMALL)
    await tills.reverse(m4)
    journal_sale(journal, m1, s1)
    journal_sale(journal, m2, s2)
    journal_sale(journal, m3, s3)
    journal_void(journal, v3, s3)
    journal_open(journal, m4, reversed_=True)
    day = s1["setl_time"][:10]

    late: list[LateAnswer] = []

    async def on_late(answer: LateAnswer) -> None:
        late.append(answer)

    # The daemon, under its own client id (the terminal id), with its persistent session.
    daemon = DaemonLink(cfg.mqtt, A, on_late_answer=on_late, presence=False)
    assert daemon.client_id == A
    task = asyncio.create_task(daemon.run())
    try:
        await daemon.wait_connected(WAIT)
        code, out, err = await run_cli("-c", str(cfg_path), "--json", "--date", day)
        assert code == 0, (out, err)
        doc = json.loads(out)
        assert doc["ok"] is True
        result = doc["result"]
        assert result["agree"] is True and result["details_compared"] is False
        assert result["terminal"] == {"setl_cnt": 2, "medfee_sumamt": "64.50", "fund_pay_sumamt": "0.00",
                                      "acct_pay": "53.50", "psn_cash_pay": "11.00", "refd_setl_cnt": 1}
        center = result["center"]
        assert (center["setl_cnt"], center["medfee_sumamt"], center["acct_pay"], center["refd_setl_cnt"],
                center["stmt_rslt"]) == (2, "64.50", "53.50", 2, "0")  # voided and reversed: 2
        # The command was the broker's client {A}-cli; the daemon kept its one connection.
        assert f" as {A}-cli " in mqtt_broker.log_text()
        assert daemon.connected and daemon.connect_count == 1 and late == []
    finally:
        daemon.stop()
        async with asyncio.timeout(WAIT):
            await task


async def test_differences(cfg: Config, cfg_path: Path, journal: Journal, tills: Tills) -> None:
    m1, s1 = await tills.sale()  # another amount in the journal
    m2, _ = await tills.sale(SMALL)  # missing in the journal
    m3, _ = await tills.sale(SMALL)  # its answer was lost here: reversal pending
    m4, s4 = await tills.sale(SMALL)  # agrees
    a1 = amounts_of(s1)
    journal_sale(journal, m1, s1, amounts=Amounts(a1.medfee_sumamt, a1.fund_pay_sumamt, a1.acct_pay - 200,
                                                  a1.psn_cash_pay + 200))
    journal_open(journal, m3)
    journal_sale(journal, m4, s4)
    only_here = f"E{uuid.uuid4().hex[:20]}"
    journal_sale(journal, only_here, dict(s4, setl_id="S-only-here", mdtrt_id="M-only-here"))
    day = s1["setl_time"][:10]

    report = await reconcile(cfg, day, day, journal=journal)
    assert not report.agree and report.details_compared
    assert report.differing_totals == ("fixmedins_setl_cnt", "medfee_sumamt", "acct_pay", "psn_cash_pay")
    got = {(d.msgid, d.kind): d for d in report.differences}
    assert set(got) == {(m1, "differs"), (m2, "missing_at_terminal"), (m3, "missing_at_terminal"),
                        (only_here, "missing_at_center")}
    d1 = got[m1, "differs"]
    assert d1.fields == ("acct_pay", "psn_cash_pay") and d1.center is not None and d1.center.amounts == a1
    assert got[m2, "missing_at_terminal"].center is not None
    assert "reversal pending" in (got[m3, "missing_at_terminal"].note or "")

    code, out, err = await run_cli("-c", str(cfg_path), "--date", day)  # the readable report
    assert code == 3, (out, err)
    assert "result: DIFFER" in out and f"{m1}  differs [acct_pay, psn_cash_pay]" in out
    assert f"{m2}  missing_at_terminal" in out and f"{only_here}  missing_at_center" in out
    assert ZHANG[1] not in out and "张" not in out


async def test_voided_by_the_other_terminal(cfg: Config, journal: Journal, tills: Tills) -> None:
    m1, s1 = await tills.sale(SMALL)
    await tills.void(s1["setl_id"], other_terminal=True)
    m2, s2 = await tills.sale(SMALL)
    journal_sale(journal, m1, s1)  # this terminal never saw the void
    journal_sale(journal, m2, s2)
    day = s1["setl_time"][:10]
    report = await reconcile(cfg, day, day, journal=journal)
    assert report.center.totals.count == 1 and report.terminal.count == 2
    [d] = report.differences
    assert (d.msgid, d.kind, d.fields) == (m1, "differs", ("refd_setl_flag",))
    assert d.center is not None and d.center.state == "voided" and "another terminal" in (d.note or "")


async def test_no_backend_and_wrong_password(tmp_path: Path, cfg_path: Path, mqtt_broker: Mosquitto,
                                             journal: Journal) -> None:
    """No backend listens: BACKEND_UNAVAILABLE after the answer timeout; a refused login likewise,
    with the broker's reason."""
    fast = cfg_path.read_text().replace("answer_timeout = 5.0", "answer_timeout = 1.5") \
        .replace("message_expiry = 4", "message_expiry = 1")
    cfg_path.write_text(fast)
    code, out, err = await run_cli("-c", str(cfg_path), "--date", "2026-11-25")
    assert code == 1 and "BACKEND_UNAVAILABLE (-3004)" in err and "no answer to 3201 within 1.5 s" in err, err
    pw = tmp_path / "mqtt-password"
    pw.write_text("not-the-password\n")
    code, out, err = await run_cli("-c", str(cfg_path), "--date", "2026-11-25", "--json")
    assert code == 1, (out, err)
    error = json.loads(out)["error"]
    assert error["code"] == "BACKEND_UNAVAILABLE" and "no connection to the broker" in error["detail"]
