"""The daemon: the POS API over MQTT, settlement with the backend, the journal, reversal.

:class:`Daemon` ties the parts together (architecture.md: a service asks the card session, the
session asks a reader; settlement goes service → journal → MQTT):

- readers from ``[readers]`` (a named reader, or found on PC/SC), the PSAM checked against
  ``[terminal] id`` at start and again whenever a sale finds it missing or wrong: without it the
  daemon serves what needs no PSAM and refuses sales (NO_PSAM, TERMINAL_MISMATCH), never exits;
- :class:`~sscardd.mqtt.DaemonLink` for the POS commands, the backend and presence;
- :class:`~sscardd.pos_api.Dispatcher` with one handler per op;
- :class:`~sscardd.journal.Journal`, whose unfinished rows are resumed before the first command;
- the reversal worker, which sends each due 2601 until the backend acknowledges it.

**A sale** (``sale``; architecture.md "MQTT, POS side"):

1. a repeated request id gets the stored reply (or waits for the first delivery to finish);
2. the PSAM must be this terminal's; the journal row is begun (``received``, synced);
3. the card is read (``read_basic``: genuine-card check through the PSAM), must not be expired
   nor on hold; records still owed to this card's chip are written first;
4. the PIN, by policy (``[pin.require_pin]``): the reader's keypad, or a format 4 PIN block
   deciphered with the card's SSN, or a clear PIN (insecure test option); no PIN source where one
   is required and no keypad → PIN_REQUIRED;
5. one card operation verifies the PIN and computes the card cryptograms for the 2101 and the
   2102 (:mod:`apdu_specs.sale_auth`); the card is reset afterwards;
6. 2101 (pre-settlement): a refusal or no answer refuses the sale (nothing is booked by a 2101);
   ``preview`` stops here (``previewed``);
7. ``sent`` is synced, then the 2102 is published. A final answer settles or refuses the row; no
   answer in ``mqtt.answer_timeout``, an answer that is not final, garbage or a broken link make it
   ``unknown``: the 2601 is queued, the card is held, and the POS gets OUTCOME_UNKNOWN;
8. the chip record (DF04/EF08) is written; if that fails the sale stands, the receipt says
   ``chip_record: "pending"`` and the record is written the next time the card is seen.

Every reply to a ``sale`` or ``sale.void`` that reached the journal is stored (masked) before it
is published, so a repeated request id gets the same answer. A request id names one attempt: a new
attempt after a wrong PIN needs a new id.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any, Final, Literal, TypeVar

import structlog

from apdu_specs import sale_auth
from apdu_specs.identifiers import mask_name
from sscardd import __version__
from sscardd import backend as B
from sscardd import config as config_mod
from sscardd import log as log_mod
from sscardd import metrics as metrics_mod
from sscardd.config import Config
from sscardd.errors import SSCardError
from sscardd.journal import Amounts, Begun, CardOnHold, Entry, IdReused, IllegalTransition, Journal, State
from sscardd.kiosk import KioskError, KioskServer
from sscardd.mqtt import AnswerTimeout, Command, DaemonLink, LateAnswer, LinkError
from sscardd.notify import Notifier, watchdog_loop
from sscardd.pos_api import (
    BlockPin,
    CardReadArgs,
    Dispatcher,
    KeypadPin,
    PinChangeArgs,
    PinVerifyArgs,
    PosRequest,
    SaleArgs,
    SaleVoidArgs,
    StoredReply,
    format_money,
    resolve_pin,
    resolve_pin_change,
)
from sscardd.psam import PsamClient
from sscardd.readers.base import Reader, ReaderEvent, ReaderEventKind
from sscardd.readers.discover import find_card_reader, find_psam
from sscardd.session import BasicInfo, CardSession, TxnRecord

log = structlog.get_logger("sscardd.service")

T = TypeVar("T")
ChipWrite = Literal["written", "other_card", "failed"]

# 2601 results after which nothing of the original stays booked (README, "2601 reversal").
REVERSAL_DONE: Final = frozenset({"reversed", "tombstoned", "already_reversed", "already_voided",
                                  "nothing_to_reverse"})
REVERSAL_IDLE_WAIT: Final = 30.0  # the worker looks at the journal at least this often
REVERSAL_CONCURRENCY: Final = 8
STALE_SENT_MARGIN: Final = 5.0  # a `sent` row nobody works on, this long past the answer timeout: unknown
EVENT_CONNECT_WAIT: Final = 5.0
STATUS_CARD_WAIT: Final = 2.0  # daemon.status gives up on a busy card after this long


def error_reply_doc(err: SSCardError) -> dict[str, Any]:
    return {"ok": False, "error": err.to_dict()}


def ok_reply_doc(result: Mapping[str, Any]) -> dict[str, Any]:
    return {"ok": True, "result": dict(result)}


@dataclass
class PsamState:
    """The SAM slot as last checked: ``ok``, ``no_psam`` or ``mismatch``."""

    state: Literal["unknown", "ok", "no_psam", "mismatch"] = "unknown"
    terminal_no: str | None = None
    reader: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"state": self.state, "terminal_no": self.terminal_no, "reader": self.reader}


def _apdu_trace() -> Callable[[str, bytes, bytes], None] | None:
    """The APDU trace hook at DEBUG (it formats every APDU: not paid for otherwise)."""
    return log_mod.apdu_trace if logging.getLogger().isEnabledFor(logging.DEBUG) else None


def _link_changed(was_connected: bool, link: DaemonLink) -> bool:
    return link.connected != was_connected


def _amounts(setlinfo: Mapping[str, Any]) -> Amounts:
    """The four amounts of a 2102/2103 ``setlinfo``, which must add up."""
    a = Amounts(medfee_sumamt=B.fen(setlinfo, "medfee_sumamt"),
                fund_pay_sumamt=B.fen(setlinfo, "fund_pay_sumamt"),
                acct_pay=B.fen(setlinfo, "acct_pay"), psn_cash_pay=B.fen(setlinfo, "psn_cash_pay"))
    if a.fund_pay_sumamt + a.acct_pay + a.psn_cash_pay != a.medfee_sumamt:
        raise B.BackendGarbage("the split does not add up to the total")
    return a


def _setl_time_digits(setl_time: str | None, fallback: datetime) -> str:
    digits = "".join(c for c in (setl_time or "") if c.isdigit())[:14]
    return digits if len(digits) == 14 else fallback.strftime("%Y%m%d%H%M%S")


class Daemon:
    """One terminal's daemon. Create inside the event loop; ``await run()``; :meth:`stop` ends it.

    ``card_reader``/``psam_reader`` override ``[readers]`` (tests, benchmarks, the demo);
    ``journal`` an already open journal (closed by its owner, not here)."""

    def __init__(self, cfg: Config, *, card_reader: Reader | None = None, psam_reader: Reader | None = None,
                 journal: Journal | None = None, client_id: str | None = None,
                 notifier: Notifier | None = None) -> None:
        self.cfg = cfg
        self.terminal_id = cfg.terminal.id
        self._card_reader = card_reader
        self._given_card_reader = card_reader
        self.notifier = notifier or Notifier()  # the service manager (sd_notify); a no-op by default
        self._psam_reader = psam_reader
        self._own_journal = journal is None
        self._journal = journal
        self.psam_state = PsamState()
        self._psam: PsamClient | None = None
        self._card_lock = asyncio.Lock()
        self._find_lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self.ready = asyncio.Event()
        self._wake_reversals = asyncio.Event()
        self._inflight: dict[str, asyncio.Future[None]] = {}  # POS request id → done
        self._inflight_rows: set[int] = set()  # journal rows a handler is working on
        self._draining = False
        self.failed = False  # stopped because a task died (the exit status says so)
        self.link = DaemonLink(cfg.mqtt, self.terminal_id, on_command=self._on_command,
                               on_late_answer=self._on_late_answer, client_id=client_id)
        self.dispatcher = Dispatcher(terminal_id=self.terminal_id, max_payload=cfg.mqtt.max_payload,
                                     allow_clear_pin=cfg.pin.allow_clear_over_mqtt)
        for op, handler in {
            "card.status": self._card_status, "card.read_basic": self._card_read_basic,
            "card.read": self._card_read, "pin.verify": self._pin_verify, "pin.change": self._pin_change,
            "sale": self._sale, "sale.void": self._sale_void, "account.query": self._account_query,
        }.items():
            self.dispatcher.register(op, handler)
        self.stats: dict[str, int] = {}
        self._listeners: list[Callable[[dict[str, Any]], None]] = []
        self._reload_hooks: list[Callable[[Config], None]] = []  # e.g. the kiosk server's limits
        self._monitor: Any = None  # PcscMonitor, when PC/SC readers are watched
        self._picked_card_reader = False  # found on PC/SC (not configured): re-found after removal
        self._tasks: set[asyncio.Task[Any]] = set()
        self.kiosk: KioskServer | None = None  # the local socket, while it serves
        self._kiosk_error: str | None = None
        # [metrics] (sscardd.metrics): None when disabled. ConfigError without prometheus-client.
        self.metrics: metrics_mod.Metrics | None = metrics_mod.Metrics.from_config(cfg.metrics)

    # -- life cycle ------------------------------------------------------------------------------

    @property
    def journal(self) -> Journal:
        if self._journal is None:
            raise RuntimeError("the daemon is not running")
        return self._journal

    def stop(self) -> None:
        self._stop.set()

    def reload(self) -> bool:
        """SIGHUP: take over what can change without a restart (logging, the PIN policy and
        PIN-block key, reversal backoff, the kiosk allow-lists and limits). A bad file is refused
        with a log line naming the key, and the running configuration stays."""
        if not self.ready.is_set() or self._stop.is_set():
            # Before READY the configuration just read is the one in force; while stopping a
            # reload has nothing left to change. Neither may tell the manager "ready" again.
            log.info("SIGHUP ignored: not serving yet, or stopping")
            return False
        self.notifier.reloading("reloading the configuration")
        try:
            ok = self._reload()
        finally:
            self.notifier.ready(self.status_line())
        if not ok:
            self.notifier.status(f"{self.status_line()}; configuration NOT reloaded (see the log)")
        return ok

    def status_line(self) -> str:
        """One line for ``systemctl status``: broker, PSAM, kiosk socket, reversals waiting."""
        broker = "broker connected" if self.link.connected else \
            f"broker DOWN ({self.link.last_error or 'connecting'})"
        kiosk = ("kiosk on" if self.kiosk is not None else "kiosk off" if not self.cfg.kiosk.enabled
                 else "kiosk closed" if self._draining else "kiosk FAILED")
        return f"terminal {self.terminal_id}: {broker}; PSAM {self.psam_state.state}; {kiosk}"

    async def _status_loop(self) -> None:
        """STATUS= on every change of the broker connection (and at least once a minute)."""
        last = ""
        while True:
            line = self.status_line()
            if line != last:
                self.notifier.status(line)
                last = line
            with contextlib.suppress(TimeoutError):
                await self.link.wait_until(functools.partial(_link_changed, self.link.connected), 60.0)

    def _reload(self) -> bool:
        try:
            new, restart = config_mod.reload(self.cfg)
        except config_mod.ConfigError as exc:
            log.error("configuration not reloaded; the running one stays", error=str(exc))
            return False
        old, self.cfg = self.cfg, new
        self.dispatcher.allow_clear_pin = new.pin.allow_clear_over_mqtt
        if self._journal is not None:
            self._journal.backoff_min = new.reversal.backoff_min
            self._journal.backoff_max = new.reversal.backoff_max
        if new.logging != old.logging:
            log_mod.configure(new.logging.level, json=new.logging.json)
        for hook in self._reload_hooks:
            hook(new)
        changed = config_mod.changed_keys(old, new)
        log.info("configuration reloaded", changed=changed)
        if restart:
            log.warning("changed keys that only a restart applies", keys=restart)
        return True

    def _supervise(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        log.error("a daemon task ended; stopping", task=task.get_name(),
                  error=type(exc).__name__ if exc else "returned")
        self.failed = True
        self.stop()

    async def _drain(self) -> None:
        """Stop taking commands; wait for the sales and voids in flight (their 2102/2103 may be
        out: cutting them off would force a reversal of a sale the customer may have left with)."""
        self._draining = True
        pending = [f for f in self._inflight.values() if not f.done()]
        if pending:
            log.info("stopping: waiting for the settlements in flight", count=len(pending))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.cfg.mqtt.answer_timeout + 5.0):
                    await asyncio.gather(*(asyncio.shield(f) for f in pending), return_exceptions=True)

    async def run(self) -> None:
        """Open the journal (exclusively: :class:`JournalInUse` if another daemon has it), resume
        its unfinished rows, find the readers and the PSAM, connect and serve until :meth:`stop`.
        Stopping takes no new commands, lets the sales in flight finish (up to the answer timeout)
        and then disconnects. A background task that dies of a bug stops the daemon (the service
        manager restarts it) rather than leave it serving half."""
        lock = await asyncio.to_thread(_lock_journal, self.cfg.journal.path)
        if self._journal is None:
            self._journal = await asyncio.to_thread(Journal.from_config, self.cfg.journal, self.cfg.reversal)
        link_task: asyncio.Task[None] | None = None
        worker: asyncio.Task[None] | None = None
        side: list[asyncio.Task[None]] = []
        try:
            await self._resume()
            await self._check_psam()
            link_task = asyncio.create_task(self.link.run(), name="mqtt")
            worker = asyncio.create_task(self._reversal_worker(), name="reversals")
            for t in (link_task, worker):
                t.add_done_callback(self._supervise)
            self._start_monitor()
            await self._start_kiosk()
            await self._start_metrics()  # metrics: before READY, so READY means it listens
            # READY once the journal is open and the readers looked at: the broker may come later
            # (its state is in STATUS), and the kiosk works without it.
            self.ready.set()
            self.notifier.ready(self.status_line())
            for name, coro in (("watchdog", watchdog_loop(self.notifier, lambda: not self.failed)),
                               ("status", self._status_loop())):
                side.append(asyncio.create_task(coro, name=name))
            log.info("daemon ready", terminal_id=self.terminal_id, psam=self.psam_state.state,
                     institution=self.cfg.institution.code, institution_type=self.cfg.institution.type)
            await self._stop.wait()
            self.notifier.stopping("stopping: finishing the settlements in flight")
            # Both at once, each bounded by the answer timeout (the unit's TimeoutStopSec covers
            # that plus the disconnect): no new MQTT commands from this moment, and the kiosk's
            # calls in flight finish while the sales do.
            self._draining = True
            await asyncio.gather(self._close_kiosk(), self._drain())
        finally:
            self._draining = True
            for t in side:
                t.cancel()
            await asyncio.gather(*side, return_exceptions=True)
            if self.metrics is not None:  # metrics: no more scrapes (they read the journal)
                await self.metrics.close()
            await self._close_kiosk()
            if self._monitor is not None:
                await asyncio.to_thread(self._monitor.stop)
                self._monitor = None
            if worker is not None:
                worker.remove_done_callback(self._supervise)
                worker.cancel()
                await asyncio.gather(worker, return_exceptions=True)
            self.link.stop()
            if link_task is not None:
                link_task.remove_done_callback(self._supervise)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(5.0):
                        await asyncio.gather(link_task, return_exceptions=True)
                link_task.cancel()
                await asyncio.gather(link_task, return_exceptions=True)
            for bg in list(self._tasks):
                bg.cancel()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            # Readers handed in belong to the caller; the ones found here are closed.
            handed_in = {id(self._given_card_reader), id(self._psam_reader)}
            for reader in {r for r in (self._card_reader, self._psam.reader if self._psam else None)
                           if r is not None and id(r) not in handed_in}:
                with contextlib.suppress(Exception):
                    await reader.close()
            if self._psam is not None and self._psam_reader is None:
                self._psam = None
            if self._own_journal and self._journal is not None:
                await asyncio.to_thread(self._journal.close)
                self._journal = None
            lock.close()
            log.info("daemon stopped", terminal_id=self.terminal_id)

    async def _start_kiosk(self) -> None:
        """The local socket for kiosks and operators (``[kiosk]``). One that cannot be set up (the
        path holds a file, another daemon listens there, no permission) is logged and reported in
        ``daemon.status``; the daemon goes on serving the POS without it rather than exit."""
        if not self.cfg.kiosk.enabled:
            return
        server = KioskServer(self, self.cfg.kiosk)
        try:
            await server.start()
        except (KioskError, OSError) as exc:
            self._kiosk_error = str(exc)
            log.error("kiosk socket not started", path=str(self.cfg.kiosk.socket), error=str(exc))
            return
        self.kiosk = server
        self._reload_hooks.append(lambda new: server.update_config(new.kiosk))

    async def _close_kiosk(self) -> None:
        server, self.kiosk = self.kiosk, None
        if server is not None:
            await server.close(call_wait=self.cfg.mqtt.answer_timeout + 5.0)

    # -- metrics (sscardd.metrics; every hook elsewhere is guarded by `self.metrics is not None`) --

    async def _start_metrics(self) -> None:
        """The ``/metrics`` endpoint (``[metrics]``). One that cannot listen (the port is taken) is
        logged; the daemon serves on without it, as without the kiosk socket."""
        if self.metrics is None:
            return
        bind, port = self.cfg.metrics.bind, self.cfg.metrics.port
        try:
            await self.metrics.start(bind, port, refresh=self._metrics_refresh)
        except OSError as exc:
            log.error("metrics endpoint not started", bind=bind, port=port, error=str(exc))

    async def _metrics_refresh(self) -> None:
        """The gauges, read at each scrape."""
        assert self.metrics is not None
        counts = await self._j(self.journal.counts)
        self.metrics.set_state(broker_connected=self.link.connected, psam_ok=self.psam_state.state == "ok",
                               pending_reversals=counts.get("unknown", 0) + counts.get("reversing", 0),
                               reversals_refused=counts.get("reversal_refused", 0))

    async def _pin_counted(self, op: Awaitable[T]) -> T:
        """Await a card operation that may check the PIN; its PIN failures are counted."""
        try:
            return await op
        except SSCardError as exc:
            if self.metrics is not None:
                self.metrics.pin_failure(exc.code)
            raise

    async def _settlement_counted(self, op: Literal["sale", "sale.void"],
                                  body: Awaitable[Mapping[str, Any]]) -> Mapping[str, Any]:
        """Run a journaled sale's or void's body (a new request id only); its outcome is counted."""
        if self.metrics is None:
            return await body
        try:
            result = await body
        except SSCardError as exc:
            self.metrics.settlement(op, error=exc.code)
            raise
        except Exception:
            self.metrics.settlement(op, error="INTERNAL_ERROR")
            raise
        self.metrics.settlement(op, preview=result.get("preview") is True)
        return result

    async def _j(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        """A journal call, off the event loop (each write is an fsync)."""
        return await asyncio.to_thread(fn, *args, **kw)

    # -- readers and the PSAM --------------------------------------------------------------------

    async def _check_psam(self) -> PsamState:
        """Find the PSAM and compare its terminal number with ``[terminal] id``."""
        state = PsamState()
        try:
            if self._psam is None:
                if self._psam_reader is not None:
                    self._psam = PsamClient(self._psam_reader, trace=_apdu_trace())
                else:
                    exclude = [self._card_reader.name] if self._card_reader is not None else []
                    self._psam = await find_psam(self.cfg.readers.psam, exclude=exclude)
            if self._psam is None:
                state.state = "no_psam"
            else:
                state.reader = self._psam.reader.name
                # probe(), not the cached terminal number: the PSAM may have been swapped.
                state.terminal_no = await asyncio.to_thread(self._psam.probe)
                state.state = "ok" if state.terminal_no == self.terminal_id else "mismatch"
        except SSCardError as exc:
            log.warning("PSAM not usable", error=exc.code)
            state.state = "no_psam"
            if self._psam is not None and self._psam_reader is None and self.cfg.readers.psam is None:
                with contextlib.suppress(Exception):
                    await self._psam.reader.close()
                self._psam = None
        if state.state == "mismatch":
            log.error("the PSAM belongs to another terminal: sales are refused",
                      psam_terminal=state.terminal_no, terminal_id=self.terminal_id)
        self.psam_state = state
        return state

    async def _require_psam(self) -> PsamClient:
        """The PSAM, checked again now when it was not usable last time (NO_PSAM, TERMINAL_MISMATCH)."""
        if self.psam_state.state != "ok":
            await self._check_psam()
        if self.psam_state.state == "mismatch":
            raise SSCardError("TERMINAL_MISMATCH", psam_terminal=self.psam_state.terminal_no,
                              terminal_id=self.terminal_id)
        if self.psam_state.state != "ok" or self._psam is None:
            raise SSCardError("NO_PSAM")
        return self._psam

    async def _session(self) -> CardSession:
        async with self._find_lock:  # two requests at once must not both open a reader
            if self._card_reader is None:
                exclude = [self._psam.reader.name] if self._psam is not None else []
                self._card_reader = await find_card_reader(self.cfg.readers.card, exclude=exclude)
                self._picked_card_reader = self.cfg.readers.card is None
        psam = self._psam if self.psam_state.state == "ok" else None
        return CardSession(self._card_reader, psam, pin_policy=self.cfg.pin.policy(),
                           device_no=self.cfg.terminal.device_no, trace=_apdu_trace())

    # -- reader events ---------------------------------------------------------------------------

    def _uses_pcsc(self) -> bool:
        names = [self.cfg.readers.card, self.cfg.readers.psam]
        injected = self._card_reader is not None and self._psam_reader is not None
        return not injected and any(n is None or not n.startswith(("emulated:", "serial:")) for n in names)

    def _start_monitor(self) -> None:
        """Watch pcscd for readers and cards (events on MQTT) when PC/SC readers are in use."""
        if not self.cfg.readers.monitor or not self._uses_pcsc():
            return
        try:
            from sscardd.readers.pcsc import PcscMonitor
        except ImportError:  # pyscard not installed: no PC/SC readers to watch
            log.info("no PC/SC support: reader events off")
            return
        self._monitor = PcscMonitor()
        self._monitor.start(asyncio.get_running_loop(), self._on_reader_event)

    def _on_reader_event(self, event: ReaderEvent) -> None:
        kind = event.kind.value
        if self.metrics is not None:
            self.metrics.reader_event(event.kind)
        if event.kind is ReaderEventKind.CARD_REMOVED and self._picked_card_reader and \
                self._card_reader is not None and self._card_reader.name == event.reader:
            self._picked_card_reader = False
            reader, self._card_reader = self._card_reader, None
            self._spawn(reader.close())
        # Events name the reader and what happened, never the card holder.
        self._spawn(self._publish_event(kind, {"reader": event.reader}))
        doc = {"event": kind, "reader": event.reader, "at": B.now_beijing().isoformat(timespec="seconds")}
        for listener in list(self._listeners):
            try:
                listener(doc)
            except Exception:  # a listener's failure is its own
                log.warning("event listener failed", exc_info=True)
        if event.kind is ReaderEventKind.CARD_INSERTED:
            self._spawn(self._card_seen(event.reader))

    async def _publish_event(self, kind: str, payload: Mapping[str, Any]) -> None:
        """Best effort: an event waits a little for the broker (those of the start-up scan come
        before the first connection), then is dropped with a log line."""
        with contextlib.suppress(TimeoutError):
            await self.link.wait_connected(EVENT_CONNECT_WAIT)
        await self.link.publish_event(kind, payload)

    async def _card_seen(self, reader_name: str) -> None:
        """A card was inserted: write the chip records still owed to it (if it is the card reader's)."""
        if self.psam_state.state != "ok" or self._psam is None or reader_name == self._psam.reader.name:
            return
        try:
            session = await self._session()
            if session.card.name != reader_name:
                return
            async with self._card_lock:
                status = await session.status()
            card_no = status.get("card_no")
            if not isinstance(card_no, str):
                return
            owed = await self._j(self.journal.pending_chip_records, card_no)
            if owed:
                await self._read_card(session)  # reads identity and flushes what is owed
        except SSCardError as exc:
            log.info("card seen but not read", reader=reader_name, error=exc.code)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        async def run() -> None:
            try:
                await coro
            except Exception:
                log.warning("background task failed", exc_info=True)

        task = asyncio.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- MQTT ------------------------------------------------------------------------------------

    async def _on_command(self, cmd: Command) -> None:
        # Each command runs in its own task: what is bound here tags every log line it causes.
        structlog.contextvars.bind_contextvars(terminal_id=self.terminal_id, via="mqtt")
        if self.metrics is not None:
            metrics_mod.VIA.set("mqtt")  # this task's PIN failures are the POS's
        if self._draining:
            # Not taken: the POS times out and sends it again to the restarted daemon.
            log.info("stopping: command not taken", size=len(cmd.payload))
            return
        started = time.monotonic()
        outcome = await self.dispatcher.handle(cmd.payload, response_topic=cmd.response_topic,
                                               correlation_data=cmd.correlation_data)
        self.stats[outcome.code] = self.stats.get(outcome.code, 0) + 1
        if self.metrics is not None:
            self.metrics.pos_request(outcome.op, outcome.code, time.monotonic() - started)
        if outcome.code in ("NO_PSAM", "PSAM_KEY_LEVEL") and self.psam_state.state == "ok":
            self.psam_state = PsamState()  # pulled or swapped: looked at again before the next sale
        if outcome.topic is None or outcome.payload is None:
            return
        try:
            await self.link.reply(outcome.topic, outcome.correlation_data, outcome.payload)
        except LinkError as exc:
            # A sale's reply is stored: the POS's retry with the same id gets it.
            log.warning("reply not delivered", request_id=outcome.request_id, op=outcome.op, error=str(exc))

    async def _on_late_answer(self, late: LateAnswer) -> None:
        if late.ref is None:
            return
        infcode: Any = None
        summary: dict[str, Any] = {}
        with contextlib.suppress(ValueError, UnicodeDecodeError, AttributeError):
            doc = json.loads(late.payload.decode("utf-8"))
            infcode = doc.get("infcode")
            summary = {"err_code": doc.get("err_code"), "final": doc.get("final")}
            out = doc.get("output")
            setl = out.get("setlinfo") if isinstance(out, dict) else None
            if isinstance(setl, dict):
                summary["setl_id"] = setl.get("setl_id")
            if isinstance(out, dict) and "result" in out:
                summary["result"] = out.get("result")
        if not isinstance(infcode, int | str) or isinstance(infcode, bool):
            infcode = None
        await self._j(self.journal.note_late_answer, late.ref, infcode=infcode, summary=summary)

    async def _ask(self, infno: str, msg_id: str, inp: Mapping[str, Any], *, opter: str | None = None,
                   timeout: float | None = None) -> B.Answer:
        """Send one message and read its answer. AnswerTimeout, LinkError and BackendGarbage pass."""
        payload = B.envelope(infno, msg_id, inp, institution=self.cfg.institution,
                             expiry_s=self.link.message_expiry, opter=opter or self.terminal_id)
        started = time.monotonic()
        try:
            raw = await self.link.request(payload, timeout, ref=msg_id)
        finally:
            if self.metrics is not None:
                self.metrics.backend_request(infno, time.monotonic() - started)
        return B.parse_answer(raw, msg_id=msg_id, infno=infno)

    async def _query(self, infno: str, inp: Mapping[str, Any]) -> B.Answer:
        """A message that books nothing (1101): any failure is BACKEND_UNAVAILABLE."""
        msg_id = B.msgid(self.cfg.institution.code, B.KIND_OTHER)
        try:
            answer = await self._ask(infno, msg_id, inp)
        except (AnswerTimeout, LinkError) as exc:
            raise SSCardError("BACKEND_UNAVAILABLE", type(exc).__name__) from None
        except B.BackendGarbage as exc:
            log.warning("backend answer unreadable", infno=infno, msgid=msg_id, reason=str(exc))
            raise SSCardError("BACKEND_UNAVAILABLE", "unreadable answer") from None
        if not answer.ok:
            raise answer.error()
        return answer

    # -- shared card steps -----------------------------------------------------------------------

    async def _read_card(self, session: CardSession) -> BasicInfo:
        return (await self._read_card_state(session))[0]

    async def _read_card_state(self, session: CardSession) -> tuple[BasicInfo, bool]:
        """The card read (``read_basic``), whether it is on hold, and the chip records still owed
        to it written (best effort; logged)."""
        async with self._card_lock:
            info = await session.read_basic()
        on_hold, pending = await self._j(self.journal.card_state, info.card_no)
        for entry in pending:
            if entry.id in self._inflight_rows:
                continue  # its own sale writes it
            if await self._write_chip_record(session, entry, info.card_id) == "failed":
                break
        return info, on_hold

    async def _write_chip_record(self, session: CardSession, entry: Entry, card_id: bytes,
                                 reply: Mapping[str, Any] | None = None, *,
                                 own: bool = False) -> ChipWrite:
        """Write a settled row's DF04/EF08 record on the card ``card_id`` (if it is that row's card)
        and mark it written, with ``reply`` as the stored reply. Under the card lock, re-checked
        there: two writers can never both write one record."""
        data = entry.chip_data or {}
        try:
            if data.get("card_id") != card_id.hex().upper():
                return "other_card"  # another card under this number (reissued): not ours to write
            record = TxnRecord(seq=int(data["seq"]), terminal=str(data["terminal"]), time=str(data["time"]),
                               account_fen=int(data["account_fen"]), self_pay_fen=int(data["self_pay_fen"]),
                               fund_fen=int(data["fund_fen"]))
            async with self._card_lock:
                # The sale writing its own record needs no second look: nobody else writes a
                # row that is in flight (_flush_chip_records skips those).
                if not own and (await self._j(self.journal.get, entry.id)).chip_record != "pending":
                    return "written"
                written = await session.record_settlement(record, card_id=card_id)
                if written:
                    await self._j(self.journal.mark_chip_written, entry.id, reply=reply)
        except (SSCardError, KeyError, ValueError, TypeError, IllegalTransition) as exc:
            log.info("chip record not written", row=entry.id, error=getattr(exc, "code", type(exc).__name__))
            return "failed"
        if not written:
            log.warning("the card refused the chip record", row=entry.id)
            return "failed"
        log.info("chip record written", row=entry.id)
        return "written"

    # -- the services (POS over MQTT and the local socket share them) ------------------------------

    async def card_status(self) -> dict[str, Any]:
        """Whether a card is present and what it is; its hold and owed chip records; the PSAM."""
        session = await self._session()
        async with self._card_lock:
            out = await session.status()
        card_no = out.get("card_no")
        if isinstance(card_no, str):
            on_hold, pending = await self._j(self.journal.card_state, card_no)
            out["on_hold"], out["pending_chip_records"] = on_hold, len(pending)
        out["psam"] = self.psam_state.state
        return out

    async def current_card_no(self) -> str | None:
        """The number of the card in the reader (for per-card limits), None without one."""
        try:
            status = await self.card_status()
        except SSCardError:
            return None
        card_no = status.get("card_no")
        return card_no if isinstance(card_no, str) else None

    async def read_basic(self) -> dict[str, Any]:
        """``iReadCardBas``: the typed fields and the compat string."""
        await self._recheck_psam()
        session = await self._session()
        return (await self._read_card(session)).to_json()

    async def card_read(self, address: str, auth: str = "key", pin: str | None = None) -> dict[str, Any]:
        """``iReadCard`` in the file-address syntax; ``pin`` for files that need it (None with
        ``auth="pin"``: the reader's keypad)."""
        await self._recheck_psam()
        session = await self._session()
        async with self._card_lock:
            value = await self._pin_counted(session.read(address, pin=pin, auth=auth))
        return {"address": address, "value": value}

    async def pin_verify(self, pin: str | None) -> dict[str, Any]:
        """VERIFY on the chip (None: the keypad). An initial PIN is PIN_INITIAL."""
        session = await self._session()
        async with self._card_lock:
            await self._pin_counted(session.verify_pin(pin))
        return {"verified": True}

    async def pin_change(self, old: str | None, new: str | None, new_again: str | None) -> dict[str, Any]:
        """CHANGE PIN (all None: the keypad)."""
        session = await self._session()
        async with self._card_lock:
            await self._pin_counted(session.change_pin(old, new, new_again))
        return {"changed": True}

    async def records_list(self, pin: str | None) -> dict[str, Any]:
        """The chip's settlement log (DF04/EF08), newest first (reading it needs the PIN)."""
        await self._recheck_psam()
        session = await self._session()
        async with self._card_lock:
            records = await self._pin_counted(session.settlement_records(pin))
        return {"records": records}

    async def pin_unblock(self) -> dict[str, Any]:
        """Reset the PIN try counter (service hall: a PSAM with PUK rights)."""
        await self._require_psam()
        session = await self._session()
        async with self._card_lock:
            await session.unblock_pin()
        return {"unblocked": True}

    async def pin_reload(self, new_pin: str) -> dict[str, Any]:
        """Set a new PIN without the old one (service hall: a PSAM with PUK rights)."""
        await self._require_psam()
        session = await self._session()
        async with self._card_lock:
            await session.reload_pin(new_pin)
        return {"reloaded": True}

    async def account_query(self) -> dict[str, Any]:
        """Identity and personal account (1101) of the card in the reader."""
        await self._require_psam()
        session = await self._session()
        info = await self._read_card(session)
        answer = await self._query("1101", {"mdtrt_cert_type": "03", "mdtrt_cert_no": info.card_no,
                                            "certno": info.ssn, "card_sn": info.card_id.hex().upper()})
        try:
            out = answer.output
            base = B.section(out, "baseinfo")
            card = B.section(out, "cardinfo")
            insu = out.get("insuinfo")
            if not isinstance(insu, list) or not insu or not isinstance(insu[0], dict):
                raise B.BackendGarbage("insuinfo is not a list of objects")
            first = insu[0]
            return {
                "card_no": info.card_no, "psn_name": mask_name(info.name), "psn_no": B.text(base, "psn_no"),
                "balc": format_money(B.fen(first, "balc")), "insutype": B.text(first, "insutype"),
                "psn_type": B.text(first, "psn_type", optional=True),
                "insuplc_admdvs": B.text(first, "insuplc_admdvs", optional=True),
                "card_stas": B.text(card, "card_stas"), "activated": card.get("activated") is True,
                "cross_region": card.get("cross_region") is True,
                "cross_region_filing": card.get("cross_region_filing") is True,
            }
        except B.BackendGarbage as exc:
            log.warning("backend answer unreadable", infno="1101", reason=str(exc))
            raise SSCardError("BACKEND_UNAVAILABLE", "unreadable answer") from None

    async def card_activate(self, certno: str, password: str, new_password: str | None) -> dict[str, Any]:
        """Online activation (the backend's 9901): ID number and portal password, and the new
        password the first activation needs. The card in the reader, if any, must be the person's."""
        card_no = await self.current_card_no()
        inp: dict[str, Any] = {"certno": certno, "password": password}
        if new_password is not None:
            inp["new_password"] = new_password
        if card_no is not None:
            inp["card_no"] = card_no
        answer = await self._query(B.ACTIVATION_INFNO, inp)
        out = answer.output
        return {"psn_no": out.get("psn_no") if isinstance(out.get("psn_no"), str) else None,
                "activated": out.get("activated") is True,
                "already_activated": out.get("already_activated") is True,
                "password_changed": out.get("password_changed") is True}

    async def daemon_status(self) -> dict[str, Any]:
        """Readers, card, PSAM, broker connection, journal backlog and pending reversals, version."""
        counts = await self._j(self.journal.counts)
        card: dict[str, Any]
        try:
            # The card may be busy for a while (a keypad entry at a kiosk): status does not wait.
            async with asyncio.timeout(STATUS_CARD_WAIT):
                card = await self.card_status()
        except SSCardError as exc:
            card = {"error": exc.code}
        except TimeoutError:
            card = {"busy": True}
        return {"version": __version__, "terminal_id": self.terminal_id,
                "institution": {"code": self.cfg.institution.code, "type": self.cfg.institution.type},
                "readers": {"card": self._card_reader.name if self._card_reader else self.cfg.readers.card,
                            "psam": self.psam_state.reader},
                "psam": self.psam_state.to_json(), "card": card, "mqtt": self.link.status(),
                "journal": {"counts": counts,
                            "unfinished": sum(counts.get(str(st), 0)
                                              for st in (State.RECEIVED, State.PRE_SETTLED, State.SENT)),
                            "pending_reversals": counts.get("unknown", 0) + counts.get("reversing", 0),
                            "reversals_refused": counts.get("reversal_refused", 0)},
                "kiosk": (self.kiosk.status() if self.kiosk is not None
                          else {"listening": False, "error": self._kiosk_error}),
                "requests": dict(self.stats), "draining": self._draining}

    async def daemon_reconcile(self, begin: str, end: str) -> dict[str, Any]:
        """``sscardd reconcile`` through the daemon's own connection and journal."""
        from sscardd.reconcile import reconcile

        report = await reconcile(self.cfg, begin, end, journal=self.journal, link=self.link)
        return report.to_json()

    def add_event_listener(self, callback: Callable[[dict[str, Any]], None]) -> None:
        """``callback(event)`` for each reader/card event (``{"event", "reader", "at"}``)."""
        self._listeners.append(callback)

    def remove_event_listener(self, callback: Callable[[dict[str, Any]], None]) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(callback)

    async def _recheck_psam(self) -> None:
        """For reads that use the PSAM when there is one: look for it again if it was missing."""
        if self.psam_state.state != "ok":
            await self._check_psam()

    # -- POS ops: the PIN sources of the MQTT API resolved, then the services -------------------

    async def _pin_of(self, source: Any) -> str | None:
        """A clear PIN from a POS PIN source (a block needs the card's SSN: the card is read)."""
        if source is None or isinstance(source, KeypadPin):
            return None
        ssn = (await self._read_card(await self._session())).ssn if isinstance(source, BlockPin) else ""
        return resolve_pin(source, key=self.cfg.pin.pin_block_key, ssn=ssn, policy=self.cfg.pin.policy())

    async def _card_status(self, req: PosRequest) -> Mapping[str, Any]:
        return await self.card_status()

    async def _card_read_basic(self, req: PosRequest) -> Mapping[str, Any]:
        return await self.read_basic()

    async def _card_read(self, req: PosRequest) -> Mapping[str, Any]:
        args = req.args
        assert isinstance(args, CardReadArgs)
        return await self.card_read(args.address, args.auth, await self._pin_of(args.pin))

    async def _pin_verify(self, req: PosRequest) -> Mapping[str, Any]:
        args = req.args
        assert isinstance(args, PinVerifyArgs)
        return await self.pin_verify(await self._pin_of(args.pin))

    async def _pin_change(self, req: PosRequest) -> Mapping[str, Any]:
        args = req.args
        assert isinstance(args, PinChangeArgs)
        ssn = ""
        if args.pin.source == "block":
            await self._recheck_psam()
            ssn = (await self._read_card(await self._session())).ssn
        pins = resolve_pin_change(args.pin, key=self.cfg.pin.pin_block_key, ssn=ssn,
                                  policy=self.cfg.pin.policy())
        return await self.pin_change(*(pins or (None, None, None)))

    async def _account_query(self, req: PosRequest) -> Mapping[str, Any]:
        return await self.account_query()

    # -- sale and void: the journaled ops --------------------------------------------------------

    async def _journaled(self, req: PosRequest, body: Callable[[Entry], Awaitable[Mapping[str, Any]]],
                         *, orig_setl_id: str | None = None, preview: bool = False,
                         needs_psam: bool = True) -> Mapping[str, Any]:
        """Run ``body`` for the journal row of ``req`` — or, for a repeated request id, answer what
        the first delivery answered. Whatever ``body`` ends with is in the journal before the POS
        hears it, and the POS hears exactly what the journal holds."""
        # Claimed before the first await: a second delivery arriving meanwhile waits for this one.
        first = self._inflight.get(req.id)
        if first is not None:
            await asyncio.shield(first)
            return await self._repeat(req, preview, orig_setl_id)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._inflight[req.id] = done
        row_id: int | None = None
        try:
            if needs_psam and self.psam_state.state != "ok" and \
                    await self._j(self.journal.get_by_request_id, self.terminal_id, req.id) is None:
                await self._require_psam()  # a new sale: refused (not journaled) without the PSAM
            begun = await self._begin(req, preview, orig_setl_id)
            if not begun.created:
                raise StoredReply(await self._stored_reply(begun.entry))
            row_id = begun.entry.id
            self._inflight_rows.add(row_id)
            structlog.contextvars.bind_contextvars(row=row_id)
            try:
                return await body(begun.entry)
            except SSCardError as err:
                raise StoredReply(await self._record_failure(row_id, err)) from None
            except (asyncio.CancelledError, StoredReply):
                raise
            except Exception:
                log.error("settlement failed unexpectedly", row=row_id, exc_info=True)
                raise StoredReply(await self._record_failure(row_id, SSCardError("INTERNAL_ERROR"))) from None
        finally:
            if row_id is not None:
                self._inflight_rows.discard(row_id)
            del self._inflight[req.id]
            done.set_result(None)

    async def _begin(self, req: PosRequest, preview: bool, orig_setl_id: str | None) -> Begun:
        op: Literal["sale", "sale.void"] = "sale" if req.op == "sale" else "sale.void"
        try:
            return await self._j(self.journal.begin, req.id, op, req.raw_args, terminal_id=self.terminal_id,
                                 preview=preview, orig_setl_id=orig_setl_id)
        except IdReused:
            raise SSCardError("ID_REUSED") from None

    async def _repeat(self, req: PosRequest, preview: bool, orig_setl_id: str | None) -> Mapping[str, Any]:
        """A delivery of a request id whose first delivery has finished here."""
        begun = await self._begin(req, preview, orig_setl_id)
        if begun.created:  # the first one was refused before it reached the journal (no PSAM)
            raise SSCardError("SALE_INTERRUPTED", "the first delivery of this request was not recorded")
        raise StoredReply(await self._stored_reply(begun.entry))

    async def _stored_reply(self, entry: Entry) -> Mapping[str, Any]:
        """What a repeated request id is answered: the stored reply, else what the row's state says
        (rows left by an earlier run are resolved at start-up, and get a reply then)."""
        entry = await self._j(self.journal.get, entry.id)
        if entry.reply is not None:
            return entry.reply
        if entry.state in (State.SENT, State.UNKNOWN, State.REVERSING, State.REVERSAL_REFUSED):
            return error_reply_doc(SSCardError("OUTCOME_UNKNOWN"))
        return error_reply_doc(SSCardError("SALE_INTERRUPTED"))

    async def _record_failure(self, row_id: int, err: SSCardError) -> Mapping[str, Any]:
        """Put a failure of the row's handler in the journal and return the reply the POS gets:
        before ``sent`` the row is refused with ``err``; while ``sent`` (the message may be out) it
        becomes unknown and is reversed; once it has an outcome, that outcome's stored reply
        stands — a failure after the settlement never contradicts it."""
        entry = await self._j(self.journal.get, row_id)
        if entry.state == State.SENT:
            await self._unknown(row_id, f"failed while sent: {err.code}")
            entry = await self._j(self.journal.get, row_id)
        elif entry.state in (State.RECEIVED, State.PRE_SETTLED):
            entry = await self._j(self.journal.mark_refused, row_id, code=err.code, message=err.message,
                                  reply=error_reply_doc(err))
        if entry.reply is None:
            await self._j(self.journal.store_reply, row_id, error_reply_doc(err))
            entry = await self._j(self.journal.get, row_id)
        assert entry.reply is not None
        return entry.reply

    async def _sale(self, req: PosRequest) -> Mapping[str, Any]:
        args = req.args
        assert isinstance(args, SaleArgs)
        return await self._journaled(
            req, lambda entry: self._settlement_counted("sale", self._run_sale(entry, args)),
            preview=args.preview)

    async def _run_sale(self, entry: Entry, args: SaleArgs) -> Mapping[str, Any]:
        cfg = self.cfg
        total = format_money(args.total_fen)
        session = await self._session()
        info, on_hold = await self._read_card_state(session)
        if info.expired():
            raise SSCardError("CARD_EXPIRED")
        if on_hold:
            raise SSCardError("CARD_ON_HOLD")

        # The PIN, by this institution's policy.
        required = cfg.requires_pin()
        keypad = False
        pin: str | None = None
        if args.pin is None:
            if required:
                if not session.card.has_keypad:
                    raise SSCardError("PIN_REQUIRED")
                keypad = True
        elif isinstance(args.pin, KeypadPin):
            if not session.card.has_keypad:
                raise SSCardError("UNSUPPORTED", "this reader has no PIN keypad")
            keypad = True
        else:
            pin = resolve_pin(args.pin, key=cfg.pin.pin_block_key, ssn=info.ssn, policy=cfg.pin.policy())

        m2101 = B.msgid(cfg.institution.code, B.KIND_PRESETTLE, entry.id)
        m2102 = B.msgid(cfg.institution.code, B.KIND_SETTLE, entry.id)
        challenges = [sale_auth.sale_challenge(m, total, self.terminal_id) for m in (m2101, m2102)]
        async with self._card_lock:
            auth = await self._pin_counted(session.authorise_sale(info.card_id, challenges, pin=pin,
                                                                  keypad=keypad))

        def sale_input(index: int) -> dict[str, Any]:
            return {
                "mdtrt_cert_type": "03", "mdtrt_cert_no": info.card_no, "certno": info.ssn, "med_type": "41",
                "medfee_sumamt": total, "acct_used_flag": "1", "pin_verified": auth.pin_verified,
                "card_auth": auth.card_auth(index),
                "drugdetail": [{"feedetl_sn": str(i + 1), "medins_list_codg": it.code, "cnt": it.qty,
                                "pric": format_money(it.price_fen)} for i, it in enumerate(args.items)],
            }

        opter = args.operator.id
        # 2101: books nothing; no answer simply refuses the sale.
        try:
            pre = await self._ask("2101", m2101, sale_input(0), opter=opter)
        except (AnswerTimeout, LinkError) as exc:
            raise SSCardError("BACKEND_UNAVAILABLE", type(exc).__name__) from None
        except B.BackendGarbage as exc:
            log.warning("backend answer unreadable", infno="2101", msgid=m2101, reason=str(exc))
            raise SSCardError("BACKEND_UNAVAILABLE", "unreadable answer") from None
        if not pre.ok:
            raise pre.error()
        try:
            receipt, pre_amounts = self._receipt(pre.output, info, auth.pin_verified, m2101, args.total_fen)
        except B.BackendGarbage as exc:
            log.warning("backend answer unreadable", infno="2101", msgid=m2101, reason=str(exc))
            raise SSCardError("BACKEND_UNAVAILABLE", "unreadable answer") from None
        await self._j(self.journal.mark_pre_settled, entry.id, msgid_2101=m2101, amounts=pre_amounts,
                      card_no=info.card_no, psn_no=receipt["psn_no"])
        if args.preview:
            result = {**receipt, "preview": True}
            await self._j(self.journal.mark_previewed, entry.id, reply=ok_reply_doc(result))
            return result

        # 2102: from here on money may move.
        try:
            await self._j(self.journal.mark_sent, entry.id, msgid=m2102, infno="2102")
        except CardOnHold:
            raise SSCardError("CARD_ON_HOLD") from None
        answer = await self._settle_message(entry.id, "2102", m2102, sale_input(1), opter)
        if not answer.ok:
            raise await self._refused(entry.id, answer)
        try:
            receipt, amounts = self._receipt(answer.output, info, auth.pin_verified, m2102, args.total_fen)
            setl_id = receipt["setl_id"]
            if not isinstance(setl_id, str) or not setl_id:
                raise B.BackendGarbage("setl_id missing")
        except B.BackendGarbage as exc:
            # Not a settlement this daemon can stand behind (e.g. another total): reversed.
            log.error("ALARM: 2102 answer unusable; reversing", row=entry.id, msgid=m2102, reason=str(exc))
            await self._unknown(entry.id, f"unusable 2102 answer: {exc}")
            raise SSCardError("OUTCOME_UNKNOWN") from None
        now = B.now_beijing()
        chip = {"seq": entry.id & 0xFFFF, "terminal": self.terminal_id,
                "time": _setl_time_digits(receipt.get("setl_time"), now),
                "account_fen": amounts.acct_pay, "self_pay_fen": amounts.psn_cash_pay,
                "fund_fen": amounts.fund_pay_sumamt, "card_id": info.card_id.hex().upper()}
        result = {**receipt, "chip_record": "pending"}
        settled = await self._j(self.journal.mark_settled, entry.id, setl_id=setl_id, amounts=amounts,
                                mdtrt_id=receipt.get("mdtrt_id"), setl_time=receipt.get("setl_time"),
                                insutype=receipt.get("insutype"), chip_data=chip, reply=ok_reply_doc(result))
        written = {**result, "chip_record": "written"}
        if await self._write_chip_record(session, settled, info.card_id, ok_reply_doc(written),
                                         own=True) == "written":
            result = written
        log.info("sale settled", row=entry.id, msgid=m2102, setl_id=setl_id, total=total,
                 chip_record=result["chip_record"])
        return result

    async def _settle_message(self, row_id: int, infno: Literal["2102", "2103"], msg_id: str,
                              inp: Mapping[str, Any], opter: str) -> B.Answer:
        """Publish a settling message (the row is ``sent``) and return a *final* answer; anything else
        makes the row ``unknown`` (reversal queued) and raises OUTCOME_UNKNOWN."""
        try:
            answer = await self._ask(infno, msg_id, inp, opter=opter)
        except (AnswerTimeout, LinkError) as exc:
            await self._unknown(row_id, f"{infno}: {type(exc).__name__}")
            raise SSCardError("OUTCOME_UNKNOWN") from None
        except B.BackendGarbage as exc:
            await self._unknown(row_id, f"unreadable {infno} answer: {exc}")
            raise SSCardError("OUTCOME_UNKNOWN") from None
        except asyncio.CancelledError:
            # Stopping mid-settlement: the row stays ``sent`` and is resolved at the next start.
            raise
        if not answer.final:
            await self._unknown(row_id, f"{infno}: answer not final ({answer.err_code})")
            raise SSCardError("OUTCOME_UNKNOWN")
        return answer

    async def _refused(self, row_id: int, answer: B.Answer) -> SSCardError:
        """A final refusal of the 2102/2103: the row is refused with it (synced); the error to raise."""
        err = answer.error()
        await self._j(self.journal.mark_refused, row_id, code=err.code, message=err.message,
                      reply=error_reply_doc(err))
        return err

    async def _unknown(self, row_id: int, reason: str) -> None:
        reversal = B.msgid(self.cfg.institution.code, B.KIND_REVERSAL, row_id)
        await self._j(self.journal.mark_unknown, row_id, reversal_msgid=reversal, reason=reason,
                      reply=error_reply_doc(SSCardError("OUTCOME_UNKNOWN")))
        log.warning("settlement outcome unknown: reversing", row=row_id, reversal_msgid=reversal,
                    reason=reason)
        self._wake_reversals.set()

    def _receipt(self, output: Mapping[str, Any], info: BasicInfo, pin_verified: bool,
                 msg_id: str, total_fen: int) -> tuple[dict[str, Any], Amounts]:
        """The POS receipt from a 2101/2102 output, and its amounts for the journal. The money is
        checked: the backend's total must be the sale's, and its split must add up."""
        s = B.section(output, "setlinfo")
        amounts = _amounts(s)
        if amounts.medfee_sumamt != total_fen:
            raise B.BackendGarbage("the answer's total is not the sale's")
        lines_in = output.get("detlcutinfo")
        if not isinstance(lines_in, list):
            raise B.BackendGarbage("detlcutinfo is not a list")
        lines = []
        for ln in lines_in:
            if not isinstance(ln, dict):
                raise B.BackendGarbage("a detlcutinfo line is not an object")
            cnt = ln.get("cnt")
            if isinstance(cnt, bool) or not isinstance(cnt, int):
                raise B.BackendGarbage("cnt is not an integer")
            lines.append({
                "code": B.text(ln, "medins_list_codg"), "item_name": B.text(ln, "name", optional=True),
                "class": B.text(ln, "item_class", optional=True), "qty": cnt,
                "price": format_money(B.fen(ln, "pric")),
                "amount": format_money(B.fen(ln, "det_item_fee_sumamt")),
                "selfpay_prop": B.text(ln, "selfpay_prop", optional=True),
                "fulamt_ownpay_amt": format_money(B.fen(ln, "fulamt_ownpay_amt")),
                "preselfpay_amt": format_money(B.fen(ln, "preselfpay_amt")),
                "fund_pay": format_money(B.fen(ln, "fund_pay")),
                "acct_pay": format_money(B.fen(ln, "acct_pay")),
                "psn_cash_pay": format_money(B.fen(ln, "psn_cash_pay")),
            })
        return {
            "setl_id": B.text(s, "setl_id", optional=True), "mdtrt_id": B.text(s, "mdtrt_id", optional=True),
            "setl_time": B.text(s, "setl_time", optional=True), "msgid": msg_id,
            "psn_no": B.text(s, "psn_no", optional=True),
            "card_no": info.card_no, "psn_name": mask_name(info.name),
            "fixmedins_code": self.cfg.institution.code, "fixmedins_name": self.cfg.institution.name,
            "fixmedins_type": self.cfg.institution.type, "terminal_id": self.terminal_id,
            "insutype": B.text(s, "insutype", optional=True),
            "cross_region": s.get("cross_region") is True,
            "pin_verified": pin_verified,
            "medfee_sumamt": format_money(amounts.medfee_sumamt),
            "fund_pay_sumamt": format_money(amounts.fund_pay_sumamt),
            "acct_pay": format_money(amounts.acct_pay),
            "psn_cash_pay": format_money(amounts.psn_cash_pay),
            "fulamt_ownpay_amt": format_money(B.fen(s, "fulamt_ownpay_amt")),
            "preselfpay_amt": format_money(B.fen(s, "preselfpay_amt")),
            "balc": format_money(B.fen(s, "balc")),
            "lines": lines,
        }, amounts

    async def _sale_void(self, req: PosRequest) -> Mapping[str, Any]:
        args = req.args
        assert isinstance(args, SaleVoidArgs)
        # A void needs no card and no PSAM (the broker authenticates the terminal).
        return await self._journaled(
            req, lambda entry: self._settlement_counted("sale.void", self._run_void(entry, args)),
            orig_setl_id=args.setl_id, needs_psam=False)

    async def _run_void(self, entry: Entry, args: SaleVoidArgs) -> Mapping[str, Any]:
        m2103 = B.msgid(self.cfg.institution.code, B.KIND_SETTLE, entry.id)
        orig = await self._j(self.journal.find_settled_sale, args.setl_id)
        inp: dict[str, Any] = {"setl_id": args.setl_id}
        if orig is not None and orig.mdtrt_id:
            inp["mdtrt_id"] = orig.mdtrt_id
        try:
            await self._j(self.journal.mark_sent, entry.id, msgid=m2103, infno="2103")
        except CardOnHold:
            raise SSCardError("CARD_ON_HOLD") from None
        opter = args.operator.id if args.operator is not None else self.terminal_id
        answer = await self._settle_message(entry.id, "2103", m2103, inp, opter)
        if not answer.ok:
            raise await self._refused(entry.id, answer)
        try:
            s = B.section(answer.output, "setlinfo")
            amounts = _amounts(s)
            result = {"setl_id": args.setl_id, "mdtrt_id": B.text(s, "mdtrt_id", optional=True),
                      "void_time": B.text(s, "void_time", optional=True), "msgid": m2103,
                      "refd_setl_flag": "1",
                      "medfee_sumamt": format_money(amounts.medfee_sumamt),
                      "fund_pay_sumamt": format_money(amounts.fund_pay_sumamt),
                      "acct_pay": format_money(amounts.acct_pay),
                      "psn_cash_pay": format_money(amounts.psn_cash_pay),
                      "balc": format_money(B.fen(s, "balc"))}
        except B.BackendGarbage as exc:
            await self._unknown(entry.id, f"unreadable 2103 answer: {exc}")
            raise SSCardError("OUTCOME_UNKNOWN") from None
        await self._j(self.journal.mark_settled, entry.id, setl_id=args.setl_id, amounts=amounts,
                      mdtrt_id=result["mdtrt_id"], setl_time=result["void_time"], reply=ok_reply_doc(result))
        log.info("sale voided", row=entry.id, msgid=m2103, setl_id=args.setl_id)
        return result

    # -- start-up and reversal -------------------------------------------------------------------

    async def _resume(self) -> None:
        """Resolve what a previous run left unfinished (journal module docstring)."""
        for entry in await self._j(self.journal.unfinished):
            if entry.state in (State.RECEIVED, State.PRE_SETTLED):
                err = SSCardError("SALE_INTERRUPTED")
                await self._j(self.journal.mark_refused, entry.id, code=err.code, message=err.message,
                              reply=error_reply_doc(err))
                log.info("resumed: interrupted before sending, refused", row=entry.id)
            elif entry.state == State.SENT:
                await self._unknown(entry.id, "the daemon stopped before the answer")
                log.info("resumed: sent without an answer, reversing", row=entry.id)
        for entry in await self._j(self.journal.refused_reversals):
            log.error("ALARM: a reversal the backend refused still holds its card; an operator must "
                      "resolve it", row=entry.id, msgid=entry.msgid, err_code=entry.error_code)
        self._wake_reversals.set()

    async def _reverse_bounded(self, entry: Entry, sem: asyncio.Semaphore) -> None:
        async with sem:
            result = await self._reverse(entry)
        if self.metrics is not None:
            self.metrics.reversal(result)

    async def _reversal_worker(self) -> None:
        sem = asyncio.Semaphore(REVERSAL_CONCURRENCY)
        while True:
            try:
                await self._sweep_stale_sent()
                due = await self._j(self.journal.pending_reversals)
                # Side by side (bounded): in an outage N rows must not cost N answer timeouts a pass.
                results = await asyncio.gather(*(self._reverse_bounded(e, sem) for e in due),
                                               return_exceptions=True)
                for e, res in zip(due, results, strict=True):
                    if isinstance(res, Exception):
                        log.error("reversal failed", row=e.id, error=type(res).__name__)
                nxt = await self._j(self.journal.next_reversal_due)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.error("reversal worker error", exc_info=True)
                nxt = None
            wait = REVERSAL_IDLE_WAIT if nxt is None else min(max(nxt - time.time(), 0.0), REVERSAL_IDLE_WAIT)
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._wake_reversals.wait()
            self._wake_reversals.clear()

    async def _sweep_stale_sent(self) -> None:
        """A ``sent`` row no handler works on any more (its handler failed to record the outcome)
        becomes unknown once its answer cannot come in time: it is reversed, not left holding
        its card until the next restart."""
        limit = time.time() - self.cfg.mqtt.answer_timeout - STALE_SENT_MARGIN
        for entry in await self._j(self.journal.unfinished):
            if entry.state == State.SENT and entry.id not in self._inflight_rows and entry.updated_at < limit:
                await self._unknown(entry.id, "sent, and no handler is waiting for the answer")

    async def _reverse(self, entry: Entry) -> metrics_mod.ReversalResult:
        """One 2601 attempt for ``entry``: ``reversed``, ``refused`` (final) or ``retry`` (later)."""
        if not entry.msgid_2601 or not entry.msgid or not entry.infno:
            # Cannot happen through this module; never loop on it.
            log.error("ALARM: a row to reverse lacks its messages", row=entry.id)
            await self._j(self.journal.mark_reversing, entry.id)
            await self._j(self.journal.mark_reversal_refused, entry.id, code="NO_MESSAGES")
            return "refused"
        await self._j(self.journal.mark_reversing, entry.id)
        try:
            answer = await self._ask("2601", entry.msgid_2601, {"omsgid": entry.msgid, "oinfno": entry.infno})
        except (AnswerTimeout, LinkError) as exc:
            log.info("reversal unanswered; retrying later", row=entry.id, error=type(exc).__name__)
            return "retry"
        except B.BackendGarbage as exc:
            log.warning("reversal answer unreadable; retrying later", row=entry.id, reason=str(exc))
            return "retry"
        if answer.ok:
            result = answer.output.get("result")
            if result in REVERSAL_DONE:
                await self._j(self.journal.mark_reversed, entry.id, note=str(result))
                log.info("reversed", row=entry.id, msgid=entry.msgid, result=result)
                return "reversed"
            log.warning("reversal answer has no known result; retrying later", row=entry.id)
            return "retry"
        if not answer.final:
            log.info("reversal not processed; retrying later", row=entry.id, err_code=answer.err_code)
            return "retry"
        # A final refusal is stored under this 2601's msgid: retrying would get it again.
        code = answer.err_code or "BACKEND_REFUSED"
        await self._j(self.journal.mark_reversal_refused, entry.id, code=code, note=answer.err_msg or "")
        log.error("ALARM: the backend refused a reversal; the card stays held until an operator resolves it",
                  row=entry.id, msgid=entry.msgid, err_code=code)
        return "refused"


# --- the journal lock and ``sscardd run`` --------------------------------------------------------


class JournalInUse(Exception):
    """Another daemon holds this journal: two would resume (and reverse) each other's sales."""


def _lock_journal(path: Path) -> IO[bytes]:
    """An exclusive ``flock`` on ``<journal>.lock``, held while the daemon runs (closing the returned
    file releases it; so does the process ending, however it ends)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    f = open(path.with_name(path.name + ".lock"), "ab")  # noqa: SIM115 - held for the daemon's life
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise JournalInUse(f"{path}: another sscardd is running with this journal") from None
    return f




async def serve(cfg: Config) -> int:
    """Run the daemon until SIGTERM or SIGINT."""
    import signal

    try:
        daemon = Daemon(cfg, notifier=Notifier.from_env(unset=True))
    except config_mod.ConfigError as exc:  # metrics.enabled without prometheus-client
        log.error("not started", reason=str(exc))
        return 2  # as for a bad configuration (the unit does not restart on 2)
    loop = asyncio.get_running_loop()
    log_mod.install_exception_hooks(loop)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, daemon.stop)
    loop.add_signal_handler(signal.SIGHUP, daemon.reload)
    try:
        await daemon.run()
    except JournalInUse as exc:
        log.error("not started", reason=str(exc))
        return 1
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    return 1 if daemon.failed else 0
