"""The local socket API for kiosks and operators: JSON-RPC 2.0 over a Unix socket (architecture.md,
"Kiosk and operator").

One JSON object per line (UTF-8, ending in ``\\n``), in both directions. The socket
(``[kiosk] socket``, default ``/run/sscardd/kiosk.sock``) gets ``[kiosk] mode`` and ``group``
before it appears under its name: it is bound inside a fresh private (0700) directory next to it,
given its mode and group there, and renamed into place — never briefly reachable with other
permissions, and without touching the process-wide umask (the daemon has worker threads creating
files). A stale socket at the path is replaced; anything else there (a file, a live daemon) is
refused.

**Who may connect** is decided on the peer credentials the kernel recorded at ``connect()``
(``SO_PEERCRED``: uid, gid, pid; ``SO_PEERGROUPS``: the supplementary groups, also as at
``connect()``, so there is no race with a pid being reused — ``/proc/<pid>/status`` would have
one). A peer may connect when its uid is 0 or the daemon's own, or is in ``allowed_uids``, or any
of its groups (primary or supplementary) is in ``allowed_gids``; operators (``operator_uids`` /
``operator_gids``, the same rule, root and the daemon's own user always) may connect too and may
also call the operator methods. The lists are looked at again for every request, so a SIGHUP that
removes a user takes effect on its open connections. A refused peer gets one error line (−32001)
and the connection is closed; the refusal is logged with its uid, gid and pid.

Methods (``params`` is always an object, by name; unknown keys are refused; "PIN" is a string of
4..12 digits):

======================  =========================================================  ========
method                  params                                                      who
======================  =========================================================  ========
``card.status``         ``{}``                                                      kiosk
``card.read_basic``     ``{}`` → typed fields and the ``iReadCardBas`` ``compat``   kiosk
``card.read``           ``{"address", "auth": "key"|"pin", "pin"?}``                kiosk
``pin.verify``          ``{"pin"?}`` (absent: the reader's keypad)                  kiosk
``pin.change``          ``{"old", "new", "new_again"}`` or ``{}`` (the keypad)      kiosk
``account.query``       ``{}`` → identity and balance (1101)                        kiosk
``records.list``        ``{"pin"?}`` → the chip's DF04/EF08 log, decoded            kiosk
``card.activate``       ``{"certno", "password", "new_password"?}`` (9901)          kiosk
``events.subscribe``    ``{}`` → then ``event`` notifications                       kiosk
``daemon.status``       ``{}``                                                      operator
``daemon.reconcile``    ``{"begin": "YYYY-MM-DD", "end": "YYYY-MM-DD"}``            operator
``pin.unblock``         ``{}`` (a PSAM with PUK rights)                             operator
``pin.reload``          ``{"new_pin"}`` (a PSAM with PUK rights)                    operator
======================  =========================================================  ========

``address`` is the file-address syntax (``DF04EF05|84|$``), at most 200 characters of
``A-Z a-z 0-9 | $ : ^``; its grammar is checked by the card session (BAD_PARAMETER, −32000).
``certno`` is an 18-character ID number with a valid check character; passwords are 1..64
characters without control characters. PINs, passwords and the ID number are never logged
(requests are logged as method, peer uid/pid, outcome and duration only) and never echoed in an
error.

Errors (``{"jsonrpc": "2.0", "id", "error": {"code", "message", "data"?}}``):

========  =========================================================================================
−32700    parse error: not UTF-8, not JSON, a key repeated, NaN/Infinity (``id`` null)
−32600    invalid request: not an object, a batch (arrays are not supported: one request per line),
          ``jsonrpc`` not ``"2.0"``, ``method`` not a string, an unknown member, a bad ``id``
          (a string of at most 128 characters, an integer or null)
−32601    method not found (the name is not echoed)
−32602    invalid params: ``data: {"param", "reason"}`` names the parameter, never its value
−32603    internal error (a bug, logged)
−32000    application error: ``data`` is the named error (``code``, ``compat_code``, ``message``,
          ``message_zh``, details) as on MQTT, e.g. ``PIN_WRONG`` with ``tries_left``
−32001    peer not allowed (then the connection is closed)
−32002    operator method refused (the peer is not an operator)
−32003    rate limited: too many PIN attempts; ``data: {"scope": "client"|"card", "retry_after"}``
−32004    line too long (longer than ``max_line_bytes``; then the connection is closed)
−32005    too many connections (``max_connections``; then the connection is closed)
========  =========================================================================================

Requests without ``id`` are notifications: they run, and get no answer. Requests on one connection
are served in order, one at a time; connections are served concurrently (the card itself is used
by one of them at a time, under the daemon's card lock). After ``events.subscribe`` the connection
also receives ``{"jsonrpc": "2.0", "method": "event", "params": {"event", "reader", "at"}}`` lines,
interleaved between whole answers; a subscriber that does not read them is disconnected when 256
are queued.

Limits (``[kiosk.limits]``): a line longer than ``max_line_bytes`` is answered −32004 and the
connection closed, having read no more than about that many bytes of it; at most
``max_connections`` connections (others: −32005); after ``max_requests_per_connection`` requests
(0: no limit) the connection is closed once the last is answered; a connection with no request for
``idle_timeout`` seconds is closed (a subscribed one is exempt: it is waiting for events). When the
server ends a connection it sends EOF first and discards what still comes for up to a second, so
the peer reads the last answer rather than a reset.

PIN attempts: ``pin.verify``, ``pin.change``, ``records.list``, ``card.read`` with ``auth: "pin"``
and ``card.activate`` (the portal password) count as attempts — every one that is let through,
whatever its outcome (simplest and safest: a success does not buy more guesses). At most
``pin_attempts_per_client`` per peer uid (so reconnecting does not reset it) and
``pin_attempts_per_card`` per card number (the card in the reader, when there is one) within
``pin_attempt_window`` seconds; over either, −32003 without any PIN reaching the card.
``pin.reload`` (operator) sets a PIN and guesses nothing: not counted.

A client that goes away mid-call does not cut the call short: the service call runs to its end
(the card session resets the card after a PIN operation as usual) and its answer is dropped.
Closing the server waits (bounded) for the calls in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import re
import socket
import stat
import struct
import tempfile
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any, Final, NoReturn, Protocol

import structlog

from apdu_specs.identifiers import IdentifierError, validate_ssn
from sscardd.config import PIN_LEN_MAX, PIN_LEN_MIN, KioskConfig
from sscardd.errors import SSCardError
from sscardd.jsonwire import dumps, loads

log = structlog.get_logger("sscardd.kiosk")

# JSON-RPC 2.0 error codes (the -326xx are the standard's, the -3200x ours).
PARSE_ERROR: Final = -32700
INVALID_REQUEST: Final = -32600
METHOD_NOT_FOUND: Final = -32601
INVALID_PARAMS: Final = -32602
INTERNAL_ERROR: Final = -32603
APPLICATION_ERROR: Final = -32000
PEER_NOT_ALLOWED: Final = -32001
OPERATOR_REFUSED: Final = -32002
RATE_LIMITED: Final = -32003
LINE_TOO_LONG: Final = -32004
TOO_MANY_CONNECTIONS: Final = -32005

KIOSK_METHODS: Final = ("card.status", "card.read_basic", "card.read", "pin.verify", "pin.change",
                        "account.query", "records.list", "card.activate", "events.subscribe")
OPERATOR_METHODS: Final = ("daemon.status", "daemon.reconcile", "pin.unblock", "pin.reload")
# Parameters that hold a PIN, a password or an ID number: never on a command line, never logged.
SECRET_PARAMS: Final = frozenset({"pin", "old", "new", "new_again", "new_pin", "certno", "password",
                                  "new_password"})

MAX_ADDRESS_LEN: Final = 200
MAX_PASSWORD_LEN: Final = 64
MAX_ID_LEN: Final = 128
MAX_JSON_INT: Final = 2**53
READ_CHUNK: Final = 65536
WRITE_TIMEOUT: Final = 10.0  # a peer that reads nothing for this long is disconnected
EVENT_QUEUE: Final = 256
CLOSE_WAIT: Final = 30.0  # close() waits this long for the service calls in flight
# Closing a connection on our side (refused, over a limit, idle): shut down our sending side, then
# read and discard what the peer still sends for a moment. A Unix socket closed with unread data
# makes the peer's next read fail with ECONNRESET, and it might never see the answer we sent.
LINGER: Final = 1.0
LINGER_BYTES: Final = 1 << 20
MAX_UNIX_PATH: Final = 107

_PIN = re.compile(rf"[0-9]{{{PIN_LEN_MIN},{PIN_LEN_MAX}}}", re.ASCII)
_ADDRESS = re.compile(rf"[A-Za-z0-9|$:^]{{1,{MAX_ADDRESS_LEN}}}", re.ASCII)
_CERTNO = re.compile(r"[0-9]{17}[0-9Xx]", re.ASCII)
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", re.ASCII)
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]{0,31}", re.ASCII)
_SO_PEERGROUPS: Final = getattr(socket, "SO_PEERGROUPS", 59)  # Linux ≥ 4.13; Python lacks the name

EventCallback = Callable[[dict[str, Any]], None]


class KioskServices(Protocol):
    """What the server needs of the daemon (:class:`sscardd.service.Daemon` provides it). Expected
    failures raise :class:`~sscardd.errors.SSCardError`."""

    async def card_status(self) -> dict[str, Any]: ...
    async def read_basic(self) -> dict[str, Any]: ...
    async def card_read(self, address: str, auth: str = "key", pin: str | None = None) -> dict[str, Any]: ...
    async def pin_verify(self, pin: str | None) -> dict[str, Any]: ...
    async def pin_change(self, old: str | None, new: str | None, new_again: str | None) -> dict[str, Any]: ...
    async def account_query(self) -> dict[str, Any]: ...
    async def records_list(self, pin: str | None) -> dict[str, Any]: ...
    async def card_activate(self, certno: str, password: str, new_password: str | None) -> dict[str, Any]: ...
    async def pin_unblock(self) -> dict[str, Any]: ...
    async def pin_reload(self, new_pin: str) -> dict[str, Any]: ...
    async def daemon_status(self) -> dict[str, Any]: ...
    async def daemon_reconcile(self, begin: str, end: str) -> dict[str, Any]: ...
    async def current_card_no(self) -> str | None: ...
    def add_event_listener(self, callback: EventCallback) -> None: ...
    def remove_event_listener(self, callback: EventCallback) -> None: ...


class KioskError(Exception):
    """The socket cannot be set up (the reason names the path; nothing secret)."""


class RpcError(Exception):
    """A JSON-RPC error answer. ``message`` and ``data`` are our own text, never a request's value."""

    def __init__(self, code: int, message: str, data: Any = None, *, outcome: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data
        self.outcome = outcome or str(code)
        self.rid: str | int | None = None  # the request's id, when it could be read

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            out["data"] = self.data
        return out


# --- framing and encoding (strict JSON: sscardd.jsonwire) -------------------------------------


def response(rid: Any, result: Any) -> bytes:
    return dumps({"jsonrpc": "2.0", "id": rid, "result": result})


def error_response(rid: Any, err: RpcError) -> bytes:
    return dumps({"jsonrpc": "2.0", "id": rid, "error": err.to_dict()})


def notification(method: str, params: Mapping[str, Any]) -> bytes:
    return dumps({"jsonrpc": "2.0", "method": method, "params": dict(params)})


@dataclass(frozen=True)
class Request:
    """A well-formed JSON-RPC request. ``has_id`` False: a notification (no answer)."""

    id: str | int | None
    has_id: bool
    method: str
    params: dict[str, Any]


def _valid_id(v: object) -> bool:
    if v is None:
        return True
    if isinstance(v, bool):
        return False
    if isinstance(v, int):
        return abs(v) <= MAX_JSON_INT
    return isinstance(v, str) and len(v) <= MAX_ID_LEN


def parse_request(line: bytes) -> Request:
    """One line → a :class:`Request`; :class:`RpcError` (carrying the id when it was readable, in
    ``.data``-free form) otherwise. See the module docstring for what is refused."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise RpcError(PARSE_ERROR, "parse error: the line is not UTF-8") from None
    try:
        doc = loads(text)
    except RecursionError:
        raise RpcError(PARSE_ERROR, "parse error: the JSON is nested too deeply") from None
    except ValueError:
        raise RpcError(PARSE_ERROR, "parse error: not valid JSON (or a key is repeated, or NaN/Infinity)") \
            from None
    if isinstance(doc, list):
        raise RpcError(INVALID_REQUEST, "invalid request: batches are not supported; send one request "
                                        "object per line")
    if not isinstance(doc, dict):
        raise RpcError(INVALID_REQUEST, "invalid request: a request is a JSON object")
    has_id = "id" in doc
    if has_id and not _valid_id(doc["id"]):
        raise RpcError(INVALID_REQUEST, f"invalid request: id must be a string of at most {MAX_ID_LEN} "
                                        "characters, an integer or null")
    rid = doc.get("id")
    try:
        unknown = set(doc) - {"jsonrpc", "method", "params", "id"}
        if unknown:
            raise RpcError(INVALID_REQUEST, "invalid request: unknown member (allowed: jsonrpc, method, "
                                            "params, id)")
        if doc.get("jsonrpc") != "2.0":
            raise RpcError(INVALID_REQUEST, 'invalid request: "jsonrpc" must be "2.0"')
        method = doc.get("method")
        if not isinstance(method, str):
            raise RpcError(INVALID_REQUEST, 'invalid request: "method" must be a string')
        params = doc.get("params", {})
        if isinstance(params, list):
            raise RpcError(INVALID_PARAMS, "invalid params: params must be an object (by name)",
                           {"param": None, "reason": "params must be an object (by name)"})
        if not isinstance(params, dict):
            raise RpcError(INVALID_REQUEST, "invalid request: params must be an object")
    except RpcError as exc:
        exc.rid = rid
        raise
    return Request(rid, has_id, method, params)


# --- params ------------------------------------------------------------------------------------


def _bad_param(param: str | None, reason: str) -> NoReturn:
    text = f"invalid params: {param}: {reason}" if param else f"invalid params: {reason}"
    raise RpcError(INVALID_PARAMS, text, {"param": param, "reason": reason})


def _keys(params: dict[str, Any], required: str = "", optional: str = "") -> dict[str, Any]:
    req, opt = required.split(), optional.split()
    for k in params:
        if k not in req and k not in opt:
            allowed = ", ".join(req + opt) or "none"
            # A key that looks like a name is shown; anything else could be a value sent by mistake.
            _bad_param(k if _NAME.fullmatch(k) else None, f"unknown parameter (allowed: {allowed})")
    for k in req:
        if k not in params:
            _bad_param(k, "missing (required)")
    return params


def _pin(params: dict[str, Any], key: str) -> str:
    v = params[key]
    if not isinstance(v, str) or not _PIN.fullmatch(v):
        _bad_param(key, f"a PIN is a string of {PIN_LEN_MIN}..{PIN_LEN_MAX} digits")
    return v


def _opt_pin(params: dict[str, Any], key: str = "pin") -> str | None:
    return _pin(params, key) if key in params else None


def _password(params: dict[str, Any], key: str) -> str:
    v = params[key]
    if not isinstance(v, str) or not 1 <= len(v) <= MAX_PASSWORD_LEN or \
            any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 or 0xD800 <= ord(c) < 0xE000 for c in v):
        _bad_param(key, f"a password is 1..{MAX_PASSWORD_LEN} characters without control characters")
    return v


def _date(params: dict[str, Any], key: str) -> date:
    v = params[key]
    try:
        if not isinstance(v, str) or not _DATE.fullmatch(v):
            raise ValueError
        return date.fromisoformat(v)
    except ValueError:
        _bad_param(key, "a date is YYYY-MM-DD")


def _no_params(p: dict[str, Any]) -> dict[str, Any]:
    _keys(p)
    return {}


def _card_read_params(p: dict[str, Any]) -> dict[str, Any]:
    _keys(p, "address", "auth pin")
    address = p["address"]
    if not isinstance(address, str) or not _ADDRESS.fullmatch(address):
        _bad_param("address", f"a file address is 1..{MAX_ADDRESS_LEN} characters of A-Z a-z 0-9 | $ : ^")
    auth = p.get("auth", "key")
    if auth not in ("key", "pin"):
        _bad_param("auth", 'must be "key" or "pin"')
    if "pin" in p and auth != "pin":
        _bad_param("pin", 'only with "auth": "pin"')
    return {"address": address, "auth": auth, "pin": _opt_pin(p)}


def _pin_params(p: dict[str, Any]) -> dict[str, Any]:
    _keys(p, "", "pin")
    return {"pin": _opt_pin(p)}


def _pin_change_params(p: dict[str, Any]) -> dict[str, Any]:
    names = ("old", "new", "new_again")
    _keys(p, "", " ".join(names))
    if not p:
        return {"old": None, "new": None, "new_again": None}  # the keypad
    for k in names:
        if k not in p:
            _bad_param(k, "missing: give old, new and new_again, or none of them (the keypad)")
    return {k: _pin(p, k) for k in names}


def _activate_params(p: dict[str, Any]) -> dict[str, Any]:
    _keys(p, "certno password", "new_password")
    certno = p["certno"]
    try:
        if not isinstance(certno, str) or not _CERTNO.fullmatch(certno):
            raise IdentifierError("format")
        validate_ssn(certno.upper())
    except IdentifierError:
        _bad_param("certno", "an ID number is 17 digits and a check character (digit or X), with a valid "
                             "check character")
    return {"certno": certno.upper(), "password": _password(p, "password"),
            "new_password": _password(p, "new_password") if "new_password" in p else None}


def _reconcile_params(p: dict[str, Any]) -> dict[str, Any]:
    _keys(p, "begin end")
    begin, end = _date(p, "begin"), _date(p, "end")
    if end < begin:
        _bad_param("end", "must not be before begin")
    return {"begin": begin.isoformat(), "end": end.isoformat()}


def _reload_params(p: dict[str, Any]) -> dict[str, Any]:
    _keys(p, "new_pin")
    return {"new_pin": _pin(p, "new_pin")}


Call = Callable[[KioskServices, dict[str, Any]], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class Method:
    """One method: who may call it, its params check, the service call (None: the server's own),
    and whether a call with these args counts as a PIN attempt."""

    name: str
    operator: bool
    params: Callable[[dict[str, Any]], dict[str, Any]]
    call: Call | None
    pin_attempt: Callable[[dict[str, Any]], bool] = lambda _a: False


def _always(_a: dict[str, Any]) -> bool:
    return True


METHODS: Final[dict[str, Method]] = {m.name: m for m in (
    Method("card.status", False, _no_params, lambda s, a: s.card_status()),
    Method("card.read_basic", False, _no_params, lambda s, a: s.read_basic()),
    Method("card.read", False, _card_read_params, lambda s, a: s.card_read(a["address"], a["auth"], a["pin"]),
           lambda a: a["auth"] == "pin"),
    Method("pin.verify", False, _pin_params, lambda s, a: s.pin_verify(a["pin"]), _always),
    Method("pin.change", False, _pin_change_params,
           lambda s, a: s.pin_change(a["old"], a["new"], a["new_again"]), _always),
    Method("account.query", False, _no_params, lambda s, a: s.account_query()),
    Method("records.list", False, _pin_params, lambda s, a: s.records_list(a["pin"]), _always),
    Method("card.activate", False, _activate_params,
           lambda s, a: s.card_activate(a["certno"], a["password"], a["new_password"]), _always),
    Method("events.subscribe", False, _no_params, None),
    Method("daemon.status", True, _no_params, lambda s, a: s.daemon_status()),
    Method("daemon.reconcile", True, _reconcile_params,
           lambda s, a: s.daemon_reconcile(a["begin"], a["end"])),
    Method("pin.unblock", True, _no_params, lambda s, a: s.pin_unblock()),
    Method("pin.reload", True, _reload_params, lambda s, a: s.pin_reload(a["new_pin"])),
)}


# --- peers and limits --------------------------------------------------------------------------


@dataclass(frozen=True)
class Peer:
    """The credentials the kernel recorded when the peer connected."""

    uid: int
    gid: int
    pid: int
    groups: frozenset[int]  # primary and supplementary

    @classmethod
    def of(cls, sock: Any) -> Peer:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", raw)
        groups = {gid}
        try:
            # At most 256 groups fit CPython's getsockopt buffer; more (ERANGE): the primary only.
            raw_groups = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, 1024)
            groups.update(struct.unpack(f"{len(raw_groups) // 4}I", raw_groups[: len(raw_groups) // 4 * 4]))
        except OSError:
            log.debug("peer's supplementary groups not known", uid=uid, pid=pid)
        return cls(uid, gid, pid, frozenset(groups))


ANSWER_FLUSH = 2.0  # seconds close() gives finished calls' answers to go out
MAX_LINGERING_REFUSALS = 16  # refused connections waiting to close gracefully at once
PRUNE_AT = 1024  # keys in the attempt limiter before expired ones are dropped


class AttemptLimiter:
    """Sliding-window counters of PIN attempts, by key (``("client", uid)``, ``("card", card_no)``)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._hits: dict[tuple[str, Any], deque[float]] = {}

    def _window(self, key: tuple[str, Any], window: float) -> deque[float]:
        now = self._clock()
        hits = self._hits.get(key)
        if hits is None:
            hits = self._hits[key] = deque()
        while hits and hits[0] <= now - window:
            hits.popleft()
        return hits

    def retry_after(self, key: tuple[str, Any], limit: int, window: float) -> float:
        """0 if one more attempt is allowed, else the seconds until one is."""
        hits = self._window(key, window)
        if len(hits) < limit:
            if not hits:
                del self._hits[key]
            return 0.0
        return max(hits[len(hits) - limit] + window - self._clock(), 0.001)

    def record(self, key: tuple[str, Any], window: float) -> None:
        self._window(key, window).append(self._clock())
        if len(self._hits) > PRUNE_AT:
            self.prune(window)

    def prune(self, window: float) -> None:
        """Forget keys with no attempt inside ``window`` (every card that ever tried a PIN would
        otherwise stay in memory)."""
        cutoff = self._clock() - window
        for key in [k for k, hits in self._hits.items() if not hits or hits[-1] <= cutoff]:
            del self._hits[key]


class LineTooLong(Exception):
    pass


class _Conn:
    """One client connection: its line buffer, its serialized writes, its event subscription."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: Peer) -> None:
        self.reader = reader
        self.writer = writer
        self.peer = peer
        self.buf = bytearray()
        self.scanned = 0  # bytes of buf known to hold no newline
        self.lock = asyncio.Lock()
        self.closed = False
        self.requests = 0
        self.busy = False  # a request of this connection is being answered
        self.events: asyncio.Queue[dict[str, Any]] | None = None
        self.listener: EventCallback | None = None
        self.event_task: asyncio.Task[None] | None = None

    async def read_line(self, max_bytes: int) -> bytes | None:
        """The next line without its ``\\n`` (a final line without one counts); None at EOF.
        LineTooLong as soon as more than ``max_bytes`` have come without a newline."""
        while True:
            i = self.buf.find(b"\n", self.scanned)
            if i >= 0:
                if i > max_bytes:
                    raise LineTooLong
                line = bytes(self.buf[:i])
                del self.buf[: i + 1]
                self.scanned = 0
                return line[:-1] if line.endswith(b"\r") else line
            self.scanned = len(self.buf)
            if len(self.buf) > max_bytes:
                raise LineTooLong
            chunk = await self.reader.read(READ_CHUNK)
            if not chunk:
                if self.buf:
                    line = bytes(self.buf)
                    self.buf.clear()
                    return line
                return None
            self.buf += chunk

    async def send(self, data: bytes) -> bool:
        """Write one line; False (and the connection closed) when the peer is gone or stuck."""
        async with self.lock:
            if self.closed or self.writer.is_closing():
                return False
            try:
                self.writer.write(data + b"\n")
                async with asyncio.timeout(WRITE_TIMEOUT):
                    await self.writer.drain()
            except (OSError, RuntimeError):  # ConnectionError, TimeoutError; RuntimeError: closing
                self.close()
                return False
            return True

    def close(self) -> None:
        self.closed = True
        self.writer.close()

    async def linger(self) -> None:
        """Our side is done: send EOF, discard what still comes (bounded), then close."""
        async with self.lock:
            if self.closed or self.writer.is_closing():
                return
            self.closed = True
            with contextlib.suppress(OSError, RuntimeError):
                if self.writer.can_write_eof():
                    self.writer.write_eof()
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(LINGER):
                got = 0
                while got < LINGER_BYTES:
                    chunk = await self.reader.read(READ_CHUNK)
                    if not chunk:
                        break
                    got += len(chunk)
        self.writer.close()


# --- the server --------------------------------------------------------------------------------


class KioskServer:
    """The JSON-RPC server on the kiosk socket. ``await start()``, then ``await close()``;
    :meth:`update_config` on SIGHUP (allow-lists and limits)."""

    def __init__(self, services: KioskServices, cfg: KioskConfig) -> None:
        self._services = services
        self._cfg = cfg
        self._own_uid = os.geteuid()
        self._server: asyncio.Server | None = None
        self._conns: set[_Conn] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
        self._calls: set[asyncio.Task[Any]] = set()
        self._limiter = AttemptLimiter()
        self._socket_id: tuple[int, int] | None = None
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._seq = 0
        self._refusing = 0

    @property
    def config(self) -> KioskConfig:
        return self._cfg

    @property
    def path(self) -> Path:
        return self._cfg.socket

    def update_config(self, cfg: KioskConfig) -> None:
        """Apply new allow-lists and limits (the socket's path, mode and group need a restart).
        A connection whose peer is no longer allowed is closed at once (an event subscriber sends
        no requests that could be checked); the others see the new lists at their next request."""
        self._cfg = cfg
        for conn in list(self._conns):
            if not self.is_allowed(conn.peer):
                log.warning("kiosk peer no longer allowed: disconnected", uid=conn.peer.uid,
                            pid=conn.peer.pid)
                self._drop(conn)
                conn.close()

    def status(self) -> dict[str, Any]:
        """For ``daemon.status``."""
        return {"socket": str(self._cfg.socket), "listening": self._server is not None and not self._closing,
                "connections": len(self._conns),
                "subscribers": sum(1 for c in self._conns if c.events is not None),
                "calls_in_flight": len(self._calls)}

    # -- the socket ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Create the socket (mode and group as configured) and listen. KioskError when the path
        holds something that is not a stale socket, or another process listens there."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        sock = self._bind()
        try:
            self._server = await asyncio.start_unix_server(self._on_connect, sock=sock, limit=READ_CHUNK)
        except BaseException:
            sock.close()
            self._unlink()
            raise
        log.info("kiosk socket listening", path=str(self._cfg.socket), mode=f"{self._cfg.mode:04o}",
                 gid=self._cfg.group if self._cfg.group is not None else os.getegid())

    def _check_existing(self, path: Path) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise KioskError(f"{path}: exists and is not a socket (not removed)")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            log.info("replacing a stale kiosk socket", path=str(path))
            return
        except OSError as exc:
            raise KioskError(f"{path}: cannot tell whether the socket there is in use ({exc.strerror})") \
                from None
        finally:
            probe.close()
        raise KioskError(f"{path}: another process is listening on it")

    def _bind(self) -> socket.socket:
        cfg = self._cfg
        path = cfg.socket
        path.parent.mkdir(parents=True, exist_ok=True)
        self._check_existing(path)
        # Bound inside a private directory, given its mode and group there, then renamed into place:
        # it never exists under its name with other permissions, and the umask is left alone.
        tmpdir = tempfile.mkdtemp(prefix=".kiosk-", dir=path.parent)
        dirfd = os.open(tmpdir, os.O_RDONLY | os.O_DIRECTORY)
        tmp = os.path.join(tmpdir, "s")
        # A long directory can make the temporary path exceed sun_path: bind through the dir fd.
        bind_path = tmp if len(os.fsencode(tmp)) <= MAX_UNIX_PATH else f"/proc/self/fd/{dirfd}/s"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(bind_path)
            os.chmod(tmp, cfg.mode)
            os.chown(tmp, -1, cfg.group if cfg.group is not None else os.getegid())
            os.rename(tmp, path)
            st = os.lstat(path)
            self._socket_id = (st.st_dev, st.st_ino)
        except PermissionError as exc:
            sock.close()
            raise KioskError(f"{path}: cannot set up the socket ({exc.strerror})") from None
        except BaseException:
            sock.close()
            raise
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            os.close(dirfd)
            with contextlib.suppress(OSError):
                os.rmdir(tmpdir)
        sock.setblocking(False)
        return sock

    def _unlink(self) -> None:
        """Remove the socket if it is still ours (not one a newer daemon put there)."""
        if self._socket_id is None:
            return
        with contextlib.suppress(OSError):
            st = os.lstat(self._cfg.socket)
            if (st.st_dev, st.st_ino) == self._socket_id:
                os.unlink(self._cfg.socket)
        self._socket_id = None

    async def close(self, call_wait: float = CLOSE_WAIT) -> None:
        """Stop accepting and remove the socket; close the idle connections; let the service
        calls in flight finish (up to ``call_wait`` seconds, then they are cancelled) and deliver
        their answers; then close the rest. Idempotent."""
        self._closing = True
        server, self._server = self._server, None
        if server is not None:
            server.close()
        self._unlink()
        for conn in list(self._conns):
            if not conn.busy:
                conn.close()
        if self._calls:
            pending = list(self._calls)
            _done, still = await asyncio.wait(pending, timeout=call_wait)
            for task in still:
                task.cancel()
            if still:
                log.warning("kiosk calls still running at close: cancelled", count=len(still))
                await asyncio.gather(*still, return_exceptions=True)
        if self._handlers:  # the answers of the finished calls go out
            _done, _late = await asyncio.wait(list(self._handlers), timeout=ANSWER_FLUSH)
        for conn in list(self._conns):
            conn.close()
        for task in list(self._handlers):
            task.cancel()
        if self._handlers:
            await asyncio.gather(*self._handlers, return_exceptions=True)
        if server is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5.0):
                    await server.wait_closed()
        self._unlink()

    # -- peers -----------------------------------------------------------------------------------

    def _privileged(self, peer: Peer) -> bool:
        return peer.uid in (0, self._own_uid)

    def is_operator(self, peer: Peer) -> bool:
        cfg = self._cfg
        return (self._privileged(peer) or peer.uid in cfg.operator_uids
                or bool(peer.groups & cfg.operator_gids))

    def is_allowed(self, peer: Peer) -> bool:
        cfg = self._cfg
        return (self.is_operator(peer) or peer.uid in cfg.allowed_uids
                or bool(peer.groups & cfg.allowed_gids))

    # -- connections -----------------------------------------------------------------------------

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        conn: _Conn | None = None
        try:
            try:
                peer = Peer.of(writer.get_extra_info("socket"))
            except (OSError, AttributeError, struct.error):
                log.warning("kiosk peer without credentials: refused")
                return
            if self._closing:
                return
            early = _Conn(reader, writer, peer)
            if not self.is_allowed(peer):
                log.warning("kiosk peer not allowed", uid=peer.uid, gid=peer.gid, pid=peer.pid)
                await self._refuse(early, RpcError(PEER_NOT_ALLOWED, "peer not allowed"))
                return
            # Operators (and root, the daemon's user) are not counted: kiosk clients filling every
            # slot must not lock the service hall out of daemon.status.
            kiosk_conns = sum(1 for c in self._conns if not self.is_operator(c.peer))
            if not self.is_operator(peer) and kiosk_conns >= self._cfg.limits.max_connections:
                log.warning("kiosk connection refused: too many", uid=peer.uid, pid=peer.pid,
                            max_connections=self._cfg.limits.max_connections)
                await self._refuse(early, RpcError(TOO_MANY_CONNECTIONS, "too many connections"))
                return
            conn = early
            self._conns.add(conn)
            log.debug("kiosk connection", uid=peer.uid, pid=peer.pid)
            await self._serve(conn)
            self._drop(conn)  # no more events while lingering
            await conn.linger()
        except Exception:
            log.exception("kiosk connection failed")
        finally:
            if conn is not None:
                self._drop(conn)
            writer.close()
            if task is not None:
                self._handlers.discard(task)

    async def _refuse(self, conn: _Conn, err: RpcError) -> None:
        """Answer a refused connection and close it. It lingers (so the client reads the answer,
        not a reset) only while few refusals are pending: a flood of refused connections must
        not pile up open descriptors."""
        await conn.send(error_response(None, err))
        if self._refusing >= MAX_LINGERING_REFUSALS:
            conn.close()
            return
        self._refusing += 1
        try:
            await conn.linger()
        finally:
            self._refusing -= 1

    def _drop(self, conn: _Conn) -> None:
        self._conns.discard(conn)
        if conn.listener is not None:
            with contextlib.suppress(Exception):
                self._services.remove_event_listener(conn.listener)
            conn.listener = None
        if conn.event_task is not None:
            conn.event_task.cancel()

    async def _serve(self, conn: _Conn) -> None:
        while not conn.closed:
            limits = self._cfg.limits
            try:
                async with asyncio.timeout(None if conn.events is not None else limits.idle_timeout):
                    line = await conn.read_line(limits.max_line_bytes)
            except TimeoutError:
                log.info("kiosk connection idle: closed", uid=conn.peer.uid, pid=conn.peer.pid)
                return
            except LineTooLong:
                log.warning("kiosk line too long: connection closed", uid=conn.peer.uid, pid=conn.peer.pid,
                            max_line_bytes=limits.max_line_bytes)
                await conn.send(error_response(None, RpcError(
                    LINE_TOO_LONG, "line too long", {"max_line_bytes": limits.max_line_bytes})))
                return
            except OSError:
                return
            if line is None:
                return
            if not line.strip():
                continue  # blank lines between requests are harmless
            if self._closing:
                return  # stopping: no new requests (a POS-style retry goes to the next daemon)
            conn.requests += 1
            conn.busy = True
            try:
                answer, close = await self._handle_line(conn, line)
            finally:
                conn.busy = False
            if answer is not None and not await conn.send(answer):
                return
            if self._closing:
                return  # the answer of a call that was in flight at close() is out
            if conn.events is not None and conn.event_task is None and conn.listener is not None:
                conn.event_task = asyncio.create_task(self._pump_events(conn), name="kiosk events")
            limit = self._cfg.limits.max_requests_per_connection
            if close:
                return
            if limit and conn.requests >= limit:
                log.info("kiosk connection reached max_requests_per_connection: closed", uid=conn.peer.uid,
                         pid=conn.peer.pid)
                return

    async def _handle_line(self, conn: _Conn, line: bytes) -> tuple[bytes | None, bool]:
        """The answer to one line (None: a notification) and whether to close afterwards."""
        started = time.monotonic()
        peer = conn.peer
        try:
            req = parse_request(line)
        except RpcError as exc:
            self._log(None, peer, started, exc.outcome)
            return error_response(exc.rid, exc), False
        method = METHODS.get(req.method)
        name = method.name if method is not None else "?"  # an unknown name is not echoed
        try:
            if not self.is_allowed(peer):  # the lists may have changed since connect (SIGHUP)
                log.warning("kiosk peer no longer allowed", uid=peer.uid, gid=peer.gid, pid=peer.pid)
                err = RpcError(PEER_NOT_ALLOWED, "peer not allowed")
                self._log(name, peer, started, err.outcome)
                return error_response(req.id, err), True
            if method is None:
                raise RpcError(METHOD_NOT_FOUND, "method not found")
            if method.operator and not self.is_operator(peer):
                raise RpcError(OPERATOR_REFUSED, "operator method refused")
            args = method.params(req.params)
        except RpcError as exc:
            self._log(name, peer, started, exc.outcome)
            return (error_response(req.id, exc) if req.has_id else None), False
        assert method is not None
        if method.call is None:  # events.subscribe
            self._subscribe(conn)
            self._log(name, peer, started, "ok")
            return (response(req.id, {"subscribed": True}) if req.has_id else None), False
        # The call runs as its own task: a client that goes away (or a server closing) does not
        # cut a card operation short; its answer is then dropped.
        call = asyncio.create_task(self._invoke(method, args, peer, started, conn),
                                   name=f"kiosk {method.name}")
        self._calls.add(call)
        call.add_done_callback(self._calls.discard)
        outcome = await asyncio.shield(call)
        if not req.has_id:
            return None, False
        if isinstance(outcome, RpcError):
            return error_response(req.id, outcome), False
        return b'{"jsonrpc":"2.0","id":' + dumps(req.id) + b',"result":' + outcome + b"}", False

    async def _invoke(self, method: Method, args: dict[str, Any], peer: Peer, started: float,
                      conn: _Conn) -> bytes | RpcError:
        """Rate limits, the service call, the result encoded as JSON (or the error); logged."""
        outcome = "cancelled"  # only when close() gives up waiting for it
        # This call runs in its own task: these tag every line the services log for it (never the
        # client's id, which is free text).
        self._seq += 1
        structlog.contextvars.bind_contextvars(via="kiosk", op=method.name, kiosk_call=self._seq,
                                               peer_uid=peer.uid, peer_pid=peer.pid)
        try:
            if method.pin_attempt(args):
                await self._count_attempt(peer)
            assert method.call is not None
            result = await method.call(self._services, args)
            if not isinstance(result, Mapping):
                raise TypeError("a result is a JSON object")
            encoded = dumps(dict(result))
            outcome = "ok"
            return encoded
        except RpcError as exc:
            outcome = exc.outcome
            return exc
        except SSCardError as exc:
            outcome = exc.code
            try:
                data = exc.to_dict()
                dumps(data)
            except (TypeError, ValueError):
                log.error("kiosk error details not encodable", code=exc.code)
                outcome = "INTERNAL_ERROR"
                return _internal()
            return RpcError(APPLICATION_ERROR, exc.message, data)
        except Exception as exc:
            outcome = "INTERNAL_ERROR"
            log.error("kiosk call failed", method=method.name, error=type(exc).__name__, exc_info=True)
            return _internal()
        finally:
            self._log(method.name, peer, started, outcome, delivered=not conn.closed)

    async def _count_attempt(self, peer: Peer) -> None:
        lim = self._cfg.limits
        window = lim.pin_attempt_window
        client = ("client", peer.uid)
        self._check_limit(client, lim.pin_attempts_per_client, window, "client")
        try:
            card_no = await self._services.current_card_no()
        except SSCardError:
            card_no = None
        # Checked again after the await (another connection of this uid may have counted), then
        # recorded without an await in between: two calls cannot both take the last attempt.
        self._check_limit(client, lim.pin_attempts_per_client, window, "client")
        card = ("card", card_no) if card_no is not None else None
        if card is not None:
            self._check_limit(card, lim.pin_attempts_per_card, window, "card")
        self._limiter.record(client, window)
        if card is not None:
            self._limiter.record(card, window)

    def _check_limit(self, key: tuple[str, Any], limit: int, window: float, scope: str) -> None:
        wait = self._limiter.retry_after(key, limit, window)
        if wait:
            raise RpcError(RATE_LIMITED, "too many PIN attempts: try again later",
                           {"scope": scope, "retry_after": math.ceil(wait)}, outcome=f"RATE_LIMITED_{scope}")

    def _log(self, method: str | None, peer: Peer, started: float, outcome: str, **extra: Any) -> None:
        # Method, peer, outcome and duration only: never a parameter.
        log.info("kiosk request", method=method or "?", uid=peer.uid, pid=peer.pid, outcome=outcome,
                 ms=round((time.monotonic() - started) * 1000, 1), **extra)

    # -- events ----------------------------------------------------------------------------------

    def _subscribe(self, conn: _Conn) -> None:
        if conn.listener is not None:
            return  # already subscribed
        conn.events = asyncio.Queue(EVENT_QUEUE)
        loop, loop_thread = self._loop, self._loop_thread

        def put(event: dict[str, Any]) -> None:
            if conn.closed or conn.events is None:
                return
            try:
                conn.events.put_nowait(dict(event))
            except asyncio.QueueFull:
                log.warning("kiosk subscriber not reading its events: disconnected", uid=conn.peer.uid,
                            pid=conn.peer.pid)
                conn.close()

        def listener(event: dict[str, Any]) -> None:
            if loop is not None and threading.get_ident() != loop_thread:
                loop.call_soon_threadsafe(put, event)
            else:
                put(event)

        conn.listener = listener
        self._services.add_event_listener(listener)

    async def _pump_events(self, conn: _Conn) -> None:
        assert conn.events is not None
        while not conn.closed:
            event = await conn.events.get()
            try:
                line = notification("event", event)
            except (TypeError, ValueError):
                log.error("kiosk event not encodable", event=str(event.get("event")))
                continue
            if not await conn.send(line):
                return


def _internal() -> RpcError:
    return RpcError(INTERNAL_ERROR, "internal error", SSCardError("INTERNAL_ERROR").to_dict(),
                    outcome="INTERNAL_ERROR")
