"""The Prometheus endpoint (``[metrics]``, :mod:`sscardd.metrics`) of the in-process daemon of the
settlement lab (emulated card and PSAM, real mosquitto as shipped, the backend simulator), scraped
over HTTP on its loopback port after real sales, PIN failures (POS and kiosk), reads, events and a
reversal; two daemons in one process each with their own registry; disabled, nothing listens.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sscardd import config, service
from sscardd.config import ConfigError, KioskConfig, KioskLimits
from sscardd.journal import State
from sscardd.kiosk import KioskServer
from sscardd.metrics import Metrics
from sscardd.readers.base import ReaderEvent, ReaderEventKind
from tests.daemon_lab import GOOD, LI, ZHANG, A, B, SettleLab, Terminal, config_text, pin_block, running_lab
from tests.mqtt_harness import MosquittoFactory
from tests.test_kiosk import Client

pytestmark = pytest.mark.mosquitto

SMALL = [{"code": "A0002", "qty": 1, "price": "6.00"}]
OPERATOR = {"id": "0001", "name": "王药师"}
WRONG = "135790"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def lab(mosquitto_factory: MosquittoFactory, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SettleLab]:
    with running_lab(mosquitto_factory, tmp_path_factory.mktemp("metrics")) as lab:
        yield lab


@pytest.fixture(autouse=True)
def _clean_faults(lab: SettleLab) -> Iterator[None]:
    yield
    lab.faults.clear()
    lab.faults.release()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def metrics_cfg(port: int, *, enabled: bool = True) -> str:
    return f'[metrics]\nenabled = {str(enabled).lower()}\nbind = "127.0.0.1"\nport = {port}\n'


def sale(pin: dict[str, Any] | None) -> dict[str, Any]:
    args: dict[str, Any] = {"operator": OPERATOR, "items": SMALL}
    if pin is not None:
        args["pin"] = pin
    return args


def http_get(port: int, path: str = "/metrics", method: str = "GET") -> tuple[int, str, str]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read().decode()


async def scrape(port: int) -> tuple[str, Samples]:
    status, ctype, text = await asyncio.to_thread(http_get, port)
    assert status == 200 and ctype.startswith("text/plain"), (status, ctype)
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return text, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def listens(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def sockdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="sscardd-metrics-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@contextlib.asynccontextmanager
async def kiosk_client(t: Terminal, sockdir: Path) -> AsyncIterator[Client]:
    """A kiosk socket over the terminal's running daemon (the lab's config has it disabled)."""
    assert t.daemon is not None
    limits = KioskLimits(pin_attempts_per_card=100, pin_attempts_per_client=100)
    server = KioskServer(t.daemon, KioskConfig(socket=sockdir / "kiosk.sock", limits=limits))
    await server.start()
    c = await Client.connect(server.path)
    try:
        yield c
    finally:
        c.close()
        await server.close(call_wait=10.0)


async def eventually_scraped(port: int, name: str, want: float, **labels: str) -> Samples:
    """Scrape until ``name{labels}`` is ``want`` (a deadline, not a sleep standing in for a fault)."""
    deadline = time.monotonic() + 15.0
    while True:
        _, samples = await scrape(port)
        if value(samples, name, **labels) == want:
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(f"{name}{labels} is {value(samples, name, **labels)}, not {want}")
        await asyncio.sleep(0.05)


# --- counters over real traffic ------------------------------------------------------------------


async def test_sales_pins_reads_and_events_are_counted(lab: SettleLab, sockdir: Path) -> None:
    port = free_port()
    async with lab.terminal(A, ZHANG, extra=metrics_cfg(port)) as t:
        assert t.daemon is not None and t.daemon.metrics is not None
        assert t.daemon.metrics.listening == [("127.0.0.1", port)]
        ok = await t.request("sale", sale(pin_block(GOOD, ZHANG.ssn)))
        assert ok["ok"], ok
        wrong_args = sale(pin_block("111111", ZHANG.ssn))
        wrong = await t.request("sale", wrong_args, request_id="metrics-wrong-1")
        assert wrong["error"]["code"] == "PIN_WRONG", wrong
        # The same request again: the stored reply, no second card operation nor sale counted.
        again = await t.request("sale", wrong_args, request_id="metrics-wrong-1")
        assert again["error"]["code"] == "PIN_WRONG", again
        read = await t.request("card.read_basic")
        assert read["ok"], read
        void = await t.request("sale.void", {"setl_id": ok["result"]["setl_id"], "operator": OPERATOR})
        assert void["ok"], void
        assert (await t.request("sale", payload=b"{not json"))["ok"] is False
        async with kiosk_client(t, sockdir) as c:
            doc = await c.call("pin.verify", {"pin": WRONG})
            assert doc["error"]["data"]["code"] == "PIN_WRONG", doc
            assert "result" in await c.call("pin.verify", {"pin": GOOD})  # the try counter back at 3
            assert "result" in await c.call("card.read_basic")
        t.daemon._on_reader_event(ReaderEvent(ReaderEventKind.READER_ADDED, "Lab Reader 01"))
        t.daemon._on_reader_event(ReaderEvent(ReaderEventKind.CARD_REMOVED, "Lab Reader 01"))

        text, m = await scrape(port)
        assert value(m, "sscardd_pos_requests_total", op="sale", outcome="OK") == 1
        assert value(m, "sscardd_pos_requests_total", op="sale", outcome="PIN_WRONG") == 2
        assert value(m, "sscardd_pos_requests_total", op="card.read_basic", outcome="OK") == 1
        assert value(m, "sscardd_pos_requests_total", op="sale.void", outcome="OK") == 1
        assert value(m, "sscardd_pos_requests_total", op="invalid", outcome="BAD_REQUEST") == 1
        assert value(m, "sscardd_pos_request_seconds_count", op="sale") == 3
        assert value(m, "sscardd_pos_request_seconds_count", op="card.read_basic") == 1
        assert value(m, "sscardd_pos_request_seconds_bucket", op="sale", le="+Inf") == 3
        assert value(m, "sscardd_pos_request_seconds_sum", op="sale") > 0
        assert value(m, "sscardd_sales_total", outcome="settled") == 1
        assert value(m, "sscardd_sales_total", outcome="refused") == 1
        for outcome in ("previewed", "unknown", "error"):
            assert value(m, "sscardd_sales_total", outcome=outcome) == 0
            assert ("sscardd_sales_total", frozenset({("outcome", outcome)})) in m  # exists at 0
        assert value(m, "sscardd_voids_total", outcome="voided") == 1
        assert value(m, "sscardd_pin_failures_total", via="mqtt", code="PIN_WRONG") == 1
        assert value(m, "sscardd_pin_failures_total", via="kiosk", code="PIN_WRONG") == 1
        assert value(m, "sscardd_pin_failures_total", via="mqtt", code="PIN_BLOCKED") == 0
        # The wrong PIN stopped the sale at the card: one 2101 and one 2102 (the good sale), one 2103.
        for infno in ("2101", "2102", "2103"):
            assert value(m, "sscardd_backend_request_seconds_count", infno=infno) == 1, infno
        assert value(m, "sscardd_reader_events_total", event="reader_added") == 1
        assert value(m, "sscardd_reader_events_total", event="card_removed") == 1
        assert value(m, "sscardd_reader_events_total", event="card_inserted") == 0
        assert value(m, "sscardd_reversals_total", result="reversed") == 0
        assert value(m, "sscardd_broker_connected") == 1
        assert value(m, "sscardd_psam_ok") == 1
        assert value(m, "sscardd_pending_reversals") == 0
        assert value(m, "sscardd_reversals_refused") == 0
        assert any(name == "sscardd_build_info" for name, _ in m)
        # Nothing that names the card, its holder, the PINs or the requests.
        for secret in (ZHANG.card_no, ZHANG.ssn, ZHANG.name, ZHANG.serial, GOOD, WRONG, "111111",
                       ok["result"]["setl_id"], ok["result"]["msgid"], "metrics-wrong-1", OPERATOR["name"]):
            assert secret not in text, secret

        # Only /metrics, only GET and HEAD.
        assert (await asyncio.to_thread(http_get, port, "/"))[0] == 404
        assert (await asyncio.to_thread(http_get, port, "/metrics", "POST"))[0] == 405
        head = await asyncio.to_thread(http_get, port, "/metrics", "HEAD")
        assert head[0] == 200 and head[2] == ""
    # Stopping the daemon stops the endpoint.
    assert not listens(port)


async def test_unknown_outcome_and_its_reversal(lab: SettleLab) -> None:
    port = free_port()
    async with lab.terminal(A, ZHANG, answer_timeout=1.5, message_expiry=1, extra=metrics_cfg(port)) as t:
        lab.faults.arm("drop", infno="2102", terminal_id=A)
        lab.faults.arm("hold", infno="2601", terminal_id=A)
        r = await t.request("sale", sale(pin_block(GOOD, ZHANG.ssn)))
        assert r["error"]["code"] == "OUTCOME_UNKNOWN", r
        await asyncio.to_thread(lab.faults.wait_held, infno="2601")
        m = await eventually_scraped(port, "sscardd_pending_reversals", 1)
        assert value(m, "sscardd_sales_total", outcome="unknown") == 1
        assert value(m, "sscardd_pos_requests_total", op="sale", outcome="OUTCOME_UNKNOWN") == 1
        # The dropped 2102 is observed at its timeout.
        assert value(m, "sscardd_backend_request_seconds_count", infno="2102") == 1
        assert value(m, "sscardd_backend_request_seconds_sum", infno="2102") >= 1.4
        lab.faults.release(infno="2601")
        m = await eventually_scraped(port, "sscardd_reversals_total", 1, result="reversed")
        rows = await asyncio.to_thread(t.journal._query, "SELECT * FROM txn ORDER BY id DESC LIMIT 1")
        assert rows[0].state == State.REVERSED
        m = await eventually_scraped(port, "sscardd_pending_reversals", 0)
        assert value(m, "sscardd_reversals_total", result="refused") == 0
        assert value(m, "sscardd_backend_request_seconds_count", infno="2601") >= 1


# --- registries, ports, and off ------------------------------------------------------------------


async def test_two_daemons_in_one_process_count_apart(lab: SettleLab) -> None:
    pa, pb = free_port(), free_port()
    async with lab.terminal(A, ZHANG, extra=metrics_cfg(pa)) as ta, \
            lab.terminal(B, LI, psam_terminal=B, extra=metrics_cfg(pb)) as tb:
        assert ta.daemon is not None and tb.daemon is not None
        assert ta.daemon.metrics is not None and tb.daemon.metrics is not None
        assert ta.daemon.metrics.registry is not tb.daemon.metrics.registry
        r = await ta.request("sale", sale(pin_block(GOOD, ZHANG.ssn)))
        assert r["ok"], r
        _, ma = await scrape(pa)
        text_b, mb = await scrape(pb)
        assert value(ma, "sscardd_sales_total", outcome="settled") == 1
        assert value(mb, "sscardd_sales_total", outcome="settled") == 0
        assert value(mb, "sscardd_pos_request_seconds_count", op="sale") == 0
        assert ZHANG.card_no not in text_b
    # Nothing went to prometheus-client's global registry.
    assert not [n for n in prometheus_client.REGISTRY._names_to_collectors if n.startswith("sscardd_")]
    assert not listens(pa) and not listens(pb)


async def test_disabled_nothing_listens(lab: SettleLab) -> None:
    port = free_port()
    async with lab.terminal(A, ZHANG, extra=metrics_cfg(port, enabled=False)) as t:
        assert t.daemon is not None and t.daemon.metrics is None
        r = await t.request("sale", sale(pin_block(GOOD, ZHANG.ssn)))
        assert r["ok"], r
        assert not listens(port)
    async with lab.terminal(A, ZHANG) as t:  # no [metrics] at all: off
        assert t.daemon is not None and t.daemon.metrics is None


async def test_a_taken_port_leaves_the_daemon_serving(lab: SettleLab) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = int(taken.getsockname()[1])
        async with lab.terminal(A, ZHANG, extra=metrics_cfg(port)) as t:
            assert t.daemon is not None and t.daemon.metrics is not None
            assert t.daemon.metrics.listening == []
            r = await t.request("card.read_basic")
            assert r["ok"], r


async def test_enabled_without_prometheus_client_is_a_configuration_error(
        lab: SettleLab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = config_text(lab, A, tmp_path, extra=metrics_cfg(free_port()))
    cfg = config.parse(text, str(tmp_path / "sscardd.toml"))
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import fails as when not installed
    with pytest.raises(ConfigError) as exc:
        Metrics()
    assert exc.value.key == "metrics.enabled" and "sscardd[metrics]" in str(exc.value)
    async with asyncio.timeout(10):
        assert await service.serve(cfg) == 2  # not started; the unit does not restart on 2
