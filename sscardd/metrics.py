"""Optional Prometheus metrics (``[metrics]``): counters and histograms the daemon updates as it
works, served as ``/metrics`` on a loopback address.

Off by default. With ``[metrics] enabled = true`` the daemon builds one :class:`Metrics` (the
package ``prometheus-client`` is needed: the ``metrics`` extra, ``pip install 'sscardd[metrics]'``;
without it the daemon does not start, exit status 2, naming ``metrics.enabled``) and serves it
from its own event loop on ``bind``:``port`` (``localhost`` binds 127.0.0.1). Each
:class:`Metrics` has its own registry, never prometheus-client's global one: several daemons in
one process (tests, benchmarks, the demo) each count their own.

Labels take a few fixed values only; nothing from a card, a person or a request id is ever one
(no card numbers, ID numbers, names, PINs, message or request ids). Metric names (counters get
``_total`` in the exposition):

===================================  ==========  ===================================================
``sscardd_pos_requests``             counter     POS requests over MQTT by ``op`` (``invalid`` when
                                                 the request could not be parsed) and ``outcome``
                                                 (``OK`` or the error code)
``sscardd_pos_request_seconds``      histogram   time to answer a POS request over MQTT, by ``op``
``sscardd_sales``                    counter     sales by ``outcome``: ``settled``, ``previewed``,
                                                 ``refused`` (by the daemon, the card or the
                                                 backend; nothing booked), ``unknown`` (the outcome
                                                 was lost: reversed), ``error`` (a bug:
                                                 INTERNAL_ERROR). Each sale (request id) once,
                                                 however often the POS sends it; one refused before
                                                 it reached the journal (NO_PSAM, TERMINAL_MISMATCH,
                                                 ID_REUSED) is only in ``sscardd_pos_requests``
``sscardd_voids``                    counter     ``sale.void`` by ``outcome``: ``voided``,
                                                 ``refused``, ``unknown``, ``error`` (as for sales)
``sscardd_pin_failures``             counter     PIN_WRONG, PIN_BLOCKED and PIN_INITIAL from the
                                                 card (typed PIN or keypad), by ``via`` (``mqtt``: a
                                                 POS request, sales included; ``kiosk``: the local
                                                 socket) and ``code``
``sscardd_reversals``                counter     2601 attempts by ``result``: ``reversed`` (nothing
                                                 stays booked), ``refused`` (a final refusal: the
                                                 card stays held until an operator acts), ``retry``
                                                 (no answer, unreadable or not final: tried again
                                                 later)
``sscardd_reader_events``            counter     reader and card events by ``event``:
                                                 ``reader_added``, ``reader_removed``,
                                                 ``card_inserted``, ``card_removed``
``sscardd_backend_request_seconds``  histogram   backend round trips by ``infno`` (1101, 2101, 2102,
                                                 2103, 2601, 9901); one that times out is observed
                                                 at its timeout
``sscardd_broker_connected``         gauge       1 while connected to the MQTT broker
``sscardd_psam_ok``                  gauge       1 while the PSAM is this terminal's (sales
                                                 possible)
``sscardd_pending_reversals``        gauge       sales and voids with an unknown outcome, not yet
                                                 reversed
``sscardd_reversals_refused``        gauge       reversals the backend refused: each holds a card
                                                 until an operator resolves it (alert on > 0)
``sscardd_build_info``               gauge       1, labelled with the daemon's ``version``
===================================  ==========  ===================================================

The gauges are read when ``/metrics`` is scraped (the daemon's ``refresh`` callback). The
endpoint is a minimal HTTP/1.1 server on the event loop: ``GET``/``HEAD /metrics`` (the text
format, or OpenMetrics when asked for in ``Accept``), one request per connection, request head
at most 8 KiB, read within 10 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Final, Literal

import structlog

from sscardd import __version__
from sscardd.config import ConfigError, MetricsConfig
from sscardd.errors import KINDS
from sscardd.pos_api import OPS
from sscardd.readers.base import ReaderEventKind

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

log = structlog.get_logger("sscardd.metrics")

# Which transport a card operation serves: the POS command handler sets "mqtt" in its own task;
# anything else calling the daemon's public methods is the kiosk socket.
VIA: ContextVar[Literal["mqtt", "kiosk"]] = ContextVar("sscardd_metrics_via", default="kiosk")

PIN_FAILURES: Final = ("PIN_WRONG", "PIN_BLOCKED", "PIN_INITIAL")
SALE_OUTCOMES: Final = ("settled", "previewed", "refused", "unknown", "error")
VOID_OUTCOMES: Final = ("voided", "refused", "unknown", "error")
REVERSAL_RESULTS: Final = ("reversed", "refused", "retry")
# POS requests: a card read takes tens of ms, a sale with the backend a few hundred, one waiting
# for the keypad or the answer timeout seconds to a minute.
POS_BUCKETS: Final = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BACKEND_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
MAX_HEAD: Final = 8192
READ_TIMEOUT: Final = 10.0

ReversalResult = Literal["reversed", "refused", "retry"]
Refresh = Callable[[], Awaitable[None]]


def _code(code: str) -> str:
    """An outcome label: "OK" or a named error code (anything else, which cannot happen: OTHER)."""
    return code if code == "OK" or code in KINDS else "OTHER"


def _infno(infno: str) -> str:
    return infno if len(infno) == 4 and infno.isascii() and infno.isdigit() else "other"


def _bind_host(bind: str) -> str:
    """The address to listen on: a loopback one only (checked again here; the config checks it)."""
    host = "127.0.0.1" if bind == "localhost" else bind
    if not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"metrics bind address {bind!r} is not a loopback address")
    return host


class Metrics:
    """The daemon's metrics in a registry of their own, and the ``/metrics`` endpoint."""

    def __init__(self) -> None:
        try:
            import prometheus_client as prom
        except ImportError:
            raise ConfigError("metrics.enabled", "true needs the Python package prometheus-client: "
                              "install sscardd with the 'metrics' extra (pip install 'sscardd[metrics]')"
                              ) from None
        self.registry: CollectorRegistry = prom.CollectorRegistry()
        r = self.registry
        self.pos_requests: Counter = prom.Counter(
            "sscardd_pos_requests", "POS requests over MQTT by operation and outcome (OK or the error code)",
            ["op", "outcome"], registry=r)
        self.pos_request_seconds: Histogram = prom.Histogram(
            "sscardd_pos_request_seconds", "Time to answer a POS request over MQTT", ["op"],
            buckets=POS_BUCKETS, registry=r)
        self.sales: Counter = prom.Counter(
            "sscardd_sales", "Sales by outcome (each request id once)", ["outcome"], registry=r)
        self.voids: Counter = prom.Counter(
            "sscardd_voids", "Voids (sale.void) by outcome (each request id once)", ["outcome"], registry=r)
        self.pin_failures: Counter = prom.Counter(
            "sscardd_pin_failures", "PIN failures the card reported, by transport and code",
            ["via", "code"], registry=r)
        self.reversals: Counter = prom.Counter(
            "sscardd_reversals", "Reversal (2601) attempts by result", ["result"], registry=r)
        self.reader_events: Counter = prom.Counter(
            "sscardd_reader_events", "Reader and card events", ["event"], registry=r)
        self.backend_request_seconds: Histogram = prom.Histogram(
            "sscardd_backend_request_seconds", "Backend round trips by message type",
            ["infno"], buckets=BACKEND_BUCKETS, registry=r)
        self.broker_connected: Gauge = prom.Gauge(
            "sscardd_broker_connected", "1 while connected to the MQTT broker", registry=r)
        self.psam_ok: Gauge = prom.Gauge(
            "sscardd_psam_ok", "1 while the PSAM is this terminal's", registry=r)
        self.pending_reversals: Gauge = prom.Gauge(
            "sscardd_pending_reversals", "Sales with an unknown outcome not yet reversed", registry=r)
        self.reversals_refused: Gauge = prom.Gauge(
            "sscardd_reversals_refused", "Reversals the backend refused (each holds a card)",
            registry=r)
        prom.Gauge("sscardd_build_info", "The daemon's version", ["version"], registry=r) \
            .labels(version=__version__).set(1)
        # Series that exist from the start (at 0), so that rates and alerts see the first event.
        for outcome in SALE_OUTCOMES:
            self.sales.labels(outcome=outcome)
        for outcome in VOID_OUTCOMES:
            self.voids.labels(outcome=outcome)
        for via in ("mqtt", "kiosk"):
            for code in PIN_FAILURES:
                self.pin_failures.labels(via=via, code=code)
        for result in REVERSAL_RESULTS:
            self.reversals.labels(result=result)
        for kind in ReaderEventKind:
            self.reader_events.labels(event=kind.value)
        for op in OPS:
            self.pos_request_seconds.labels(op=op)
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()
        self._refresh: Refresh | None = None

    @classmethod
    def from_config(cls, cfg: MetricsConfig) -> Metrics | None:
        """The metrics when ``[metrics] enabled``, else None (ConfigError: prometheus-client missing)."""
        return cls() if cfg.enabled else None

    # -- what the daemon observes ----------------------------------------------------------------

    def pos_request(self, op: str | None, code: str, seconds: float) -> None:
        label = op if op in OPS else "invalid"
        self.pos_requests.labels(op=label, outcome=_code(code)).inc()
        self.pos_request_seconds.labels(op=label).observe(seconds)

    def settlement(self, op: Literal["sale", "sale.void"], *, error: str | None = None,
                   preview: bool = False) -> None:
        """A sale's or void's outcome: done (``preview``: a sale previewed), or failed with ``error``
        (OUTCOME_UNKNOWN: unknown, reversed; INTERNAL_ERROR: error; any other code: refused)."""
        failed = {"OUTCOME_UNKNOWN": "unknown", "INTERNAL_ERROR": "error"}.get(error or "", "refused")
        if op == "sale":
            self.sales.labels(outcome=failed if error else "previewed" if preview else "settled").inc()
        else:
            self.voids.labels(outcome=failed if error else "voided").inc()

    def pin_failure(self, code: str) -> None:
        """Counted when ``code`` is a PIN failure (other errors are ignored), by :data:`VIA`."""
        if code in PIN_FAILURES:
            self.pin_failures.labels(via=VIA.get(), code=code).inc()

    def reversal(self, result: ReversalResult) -> None:
        self.reversals.labels(result=result).inc()

    def reader_event(self, kind: ReaderEventKind) -> None:
        self.reader_events.labels(event=kind.value).inc()

    def backend_request(self, infno: str, seconds: float) -> None:
        self.backend_request_seconds.labels(infno=_infno(infno)).observe(seconds)

    def set_state(self, *, broker_connected: bool, psam_ok: bool, pending_reversals: int,
                  reversals_refused: int) -> None:
        self.broker_connected.set(1 if broker_connected else 0)
        self.psam_ok.set(1 if psam_ok else 0)
        self.pending_reversals.set(pending_reversals)
        self.reversals_refused.set(reversals_refused)

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition (text format, or OpenMetrics if ``accept`` asks for it) and its type."""
        from prometheus_client.exposition import choose_encoder

        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type

    # -- the endpoint ----------------------------------------------------------------------------

    @property
    def listening(self) -> list[tuple[str, int]]:
        """The (address, port) pairs served (empty when not started)."""
        if self._server is None:
            return []
        return [(str(s.getsockname()[0]), int(s.getsockname()[1])) for s in self._server.sockets]

    async def start(self, bind: str, port: int, *, refresh: Refresh | None = None) -> None:
        """Serve ``/metrics`` on ``bind``:``port`` (a loopback address); ``refresh`` is awaited
        before each scrape (the gauges). OSError when the port cannot be had."""
        if self._server is not None:
            raise RuntimeError("the metrics endpoint is already started")
        self._refresh = refresh
        self._server = await asyncio.start_server(self._connection, _bind_host(bind), port,
                                                  limit=MAX_HEAD, reuse_address=True)

    async def close(self) -> None:
        """Stop listening and end the connections in progress (the metrics stay readable)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for task in list(self._conns):
            task.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5.0):
                await server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            status, headers, body = await self._answer(head)
            lines = [f"HTTP/1.1 {status}", *(f"{k}: {v}" for k, v in headers.items()),
                     f"Content-Length: {len(body)}", "Connection: close", "", ""]
            writer.write("\r\n".join(lines).encode("latin-1"))
            if not head.startswith(b"HEAD "):
                writer.write(body)
            async with asyncio.timeout(READ_TIMEOUT):
                await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
            pass  # a client that went away, sent too much or too slowly: nothing to answer
        finally:
            self._conns.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(self, head: bytes) -> tuple[str, dict[str, str], bytes]:
        text = head.decode("latin-1")
        request_line, *header_lines = text.split("\r\n")
        parts = request_line.split(" ")
        plain = {"Content-Type": "text/plain; charset=utf-8"}
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return "400 Bad Request", plain, b"bad request\n"
        method, target = parts[0], parts[1].split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", {**plain, "Allow": "GET, HEAD"}, b"method not allowed\n"
        if target != "/metrics":
            return "404 Not Found", plain, b"not found: the metrics are at /metrics\n"
        accept = ""
        for line in header_lines:
            name, _, value = line.partition(":")
            if name.strip().lower() == "accept":
                accept = value.strip()
        if self._refresh is not None:
            try:
                await self._refresh()
            except Exception as exc:  # the counters are still worth serving; the gauges are stale
                log.warning("metrics: gauges not refreshed", error=type(exc).__name__)
        body, content_type = self.render(accept)
        return "200 OK", {"Content-Type": content_type}, body
