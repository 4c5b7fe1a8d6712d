"""The kiosk socket (sscardd.kiosk) over a real Unix socket: framing, every error code, limits, peer
credentials (clients run as other users: the tests run as root), operator methods, PIN rate limits,
the socket's mode and owner, concurrency, a client dying mid-call, events, socat as an independent
client and sscardctl as a subprocess.

The daemon behind the socket is a small in-test :class:`Services` returning canned answers and
raising SSCardError: the socket mechanics are under test here, not the card (the real daemon is
behind it in tests/e2e/test_kiosk_daemon.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from sscardd import kiosk
from sscardd.config import KioskConfig, KioskLimits
from sscardd.errors import SSCardError
from sscardd.kiosk import KioskError, KioskServer

ROOT = Path(__file__).resolve().parent.parent
GOOD = "246810"
WRONG = "135790"
NEW = "97531086"
CERTNO = "370202199001011237"
PORTAL_PW = "Zhang2024pw"
NEW_PW = "Better2025pw"
NOBODY = 65534
KIOSK_GID = 12345  # the socket's group in the peer tests (a number: no such group needed)
SECRETS = (GOOD, WRONG, NEW, CERTNO, PORTAL_PW, NEW_PW)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the peer tests run clients as other users")


class Services:
    """Canned answers; records which calls started and completed (secrets left out)."""

    def __init__(self) -> None:
        self.card_no: str | None = "Q54198963"
        self.started: list[str] = []
        self.completed: list[str] = []
        self.gates: dict[str, asyncio.Event] = {}
        self.delay = 0.0
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        self.active = 0
        self.max_active = 0
        self.fail_with: BaseException | None = None
        self.bad_result: Any = None

    async def _run(self, name: str) -> None:
        self.started.append(name)
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            gate = self.gates.get(name)
            if gate is not None:
                await gate.wait()
            if self.fail_with is not None:
                raise self.fail_with
        finally:
            self.active -= 1
        self.completed.append(name)

    async def card_status(self) -> dict[str, Any]:
        await self._run("card_status")
        if self.bad_result is not None:
            return self.bad_result  # type: ignore[no-any-return]
        return {"present": True, "card_no": self.card_no, "reader": "emulated"}

    async def read_basic(self) -> dict[str, Any]:
        await self._run("read_basic")
        return {"card_no": self.card_no, "name": "张三", "compat": "370200|370202199001011237|3|..."}

    async def card_read(self, address: str, auth: str = "key", pin: str | None = None) -> dict[str, Any]:
        await self._run("card_read")
        if auth == "pin" and pin is not None and pin != GOOD:
            raise SSCardError("PIN_WRONG", tries_left=2)
        if not address.endswith("$"):
            raise SSCardError("BAD_PARAMETER", "file address: must end with '$'")
        return {"address": address, "value": "DF04EF05|X|$", "auth": auth}

    async def pin_verify(self, pin: str | None) -> dict[str, Any]:
        await self._run("pin_verify")
        if pin is not None and pin != GOOD:
            raise SSCardError("PIN_WRONG", tries_left=2)
        return {"verified": True, "keypad": pin is None}

    async def pin_change(self, old: str | None, new: str | None, new_again: str | None) -> dict[str, Any]:
        await self._run("pin_change")
        if old is not None and old != GOOD:
            raise SSCardError("PIN_WRONG", tries_left=2)
        if new != new_again:
            raise SSCardError("PIN_MISMATCH")
        return {"changed": True, "keypad": old is None}

    async def account_query(self) -> dict[str, Any]:
        await self._run("account_query")
        return {"card_no": self.card_no, "balc": "1234.56"}

    async def records_list(self, pin: str | None) -> dict[str, Any]:
        await self._run("records_list")
        if pin is not None and pin != GOOD:
            raise SSCardError("PIN_WRONG", tries_left=2)
        return {"records": [{"seq": 1, "account": "12.50"}]}

    async def card_activate(self, certno: str, password: str, new_password: str | None) -> dict[str, Any]:
        await self._run("card_activate")
        if password != PORTAL_PW:
            raise SSCardError("BACKEND_REFUSED", backend_code="PASSWORD_WRONG")
        return {"activated": True, "password_changed": new_password is not None}

    async def pin_unblock(self) -> dict[str, Any]:
        await self._run("pin_unblock")
        return {"unblocked": True}

    async def pin_reload(self, new_pin: str) -> dict[str, Any]:
        await self._run("pin_reload")
        return {"reloaded": True}

    async def daemon_status(self) -> dict[str, Any]:
        await self._run("daemon_status")
        return {"version": "test", "journal": {"pending_reversals": 0}}

    async def daemon_reconcile(self, begin: str, end: str) -> dict[str, Any]:
        await self._run("daemon_reconcile")
        return {"begin": begin, "end": end, "agree": True}

    async def current_card_no(self) -> str | None:
        return self.card_no

    def add_event_listener(self, callback: Callable[[dict[str, Any]], None]) -> None:
        self.listeners.append(callback)

    def remove_event_listener(self, callback: Callable[[dict[str, Any]], None]) -> None:
        with contextlib.suppress(ValueError):
            self.listeners.remove(callback)

    def emit(self, kind: str, reader: str = "emulated") -> None:
        for cb in list(self.listeners):
            cb({"event": kind, "reader": reader, "at": "2024-05-01T10:00:00+08:00"})


class Client:
    """A JSON-RPC client on the socket (asyncio), as root unless run as a subprocess."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.next_id = 0

    @classmethod
    async def connect(cls, path: Path) -> Client:
        reader, writer = await asyncio.open_unix_connection(str(path), limit=1 << 20)
        return cls(reader, writer)

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def send(self, method: str, params: Any = None, *, rid: Any = "auto") -> Any:
        if rid == "auto":
            self.next_id += 1
            rid = self.next_id
        doc: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            doc["params"] = params
        doc["id"] = rid
        await self.send_raw(json.dumps(doc, ensure_ascii=False).encode() + b"\n")
        return rid

    async def read(self, timeout: float = 5.0) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            line = await self.reader.readline()
        assert line.endswith(b"\n"), f"connection closed ({line!r})"
        doc = json.loads(line)
        assert isinstance(doc, dict) and doc["jsonrpc"] == "2.0"
        return doc

    async def call(self, method: str, params: Any = None) -> dict[str, Any]:
        rid = await self.send(method, params)
        doc = await self.read()
        assert doc["id"] == rid, doc
        return doc

    async def eof(self, timeout: float = 5.0) -> bool:
        async with asyncio.timeout(timeout):
            return await self.reader.read() == b""

    def close(self) -> None:
        self.writer.close()


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A directory other users can reach (pytest's tmp_path is root's, mode 0700)."""
    d = Path(tempfile.mkdtemp(prefix="sscardd-kiosk-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def kiosk_cfg(sockdir: Path, *, name: str = "k.sock", limits: dict[str, Any] | None = None,
              **kw: Any) -> KioskConfig:
    lim = {"idle_timeout": 30.0, **(limits or {})}
    return KioskConfig(socket=sockdir / name, limits=KioskLimits(**lim), **kw)


@contextlib.asynccontextmanager
async def serving(services: Services, cfg: KioskConfig) -> AsyncIterator[KioskServer]:
    server = KioskServer(services, cfg)
    await server.start()
    try:
        yield server
    finally:
        await server.close(call_wait=5.0)


@contextlib.asynccontextmanager
async def clients(path: Path, n: int = 1) -> AsyncIterator[list[Client]]:
    cs = [await Client.connect(path) for _ in range(n)]
    try:
        yield cs
    finally:
        for c in cs:
            c.close()


def error_of(doc: dict[str, Any]) -> int:
    assert "error" in doc, doc
    return int(doc["error"]["code"])


# --- a client running as another user ---------------------------------------------------------

# stdlib only (-I): sends each stdin line, prints each answer line; at stdin's end reads what is
# left; "EOF" once the daemon closes. "CONNECT-FAILED <errno name>" if connect() fails.
CHILD = r"""
import errno, socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print("CONNECT-FAILED", errno.errorcode.get(e.errno, e.errno), flush=True)
    sys.exit(0)
f = s.makefile("rb")
for line in sys.stdin:
    try:
        s.sendall(line.encode())
    except OSError:
        pass
    r = f.readline()
    sys.stdout.write(r.decode() if r else "EOF\n")
    sys.stdout.flush()
    if not r:
        sys.exit(0)
try:
    s.shutdown(socket.SHUT_WR)
except OSError:
    pass
for r in iter(f.readline, b""):
    sys.stdout.write(r.decode())
print("EOF", flush=True)
"""


class Child:
    """A socket client process as ``uid``/``gid`` with ``groups`` as supplementary groups."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, path: Path, uid: int = NOBODY, gid: int = KIOSK_GID,
                    groups: tuple[int, ...] = ()) -> Child:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-I", "-c", CHILD, str(path), user=uid, group=gid, extra_groups=list(groups),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd="/")
        return cls(proc)

    async def ask(self, method: str, params: dict[str, Any] | None = None, rid: int = 1) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        doc = {"jsonrpc": "2.0", "id": rid, "method": method, "params": params or {}}
        self.proc.stdin.write(json.dumps(doc).encode() + b"\n")
        await self.proc.stdin.drain()
        async with asyncio.timeout(10):
            return (await self.proc.stdout.readline()).decode().strip()

    async def finish(self) -> list[str]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        async with asyncio.timeout(10):
            out = await self.proc.stdout.read()
            await self.proc.wait()
        return out.decode().splitlines()

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()


@contextlib.asynccontextmanager
async def child(path: Path, **kw: Any) -> AsyncIterator[Child]:
    c = await Child.start(path, **kw)
    try:
        yield c
    finally:
        c.kill()
        await c.proc.wait()


async def run_as(path: Path, lines: list[dict[str, Any]], **kw: Any) -> list[str]:
    """Send ``lines`` as another user (one at a time) and return every line printed."""
    async with child(path, **kw) as c:
        answers = [await c.ask(d["method"], d.get("params"), i + 1) for i, d in enumerate(lines)]
        return answers + await c.finish()


# --- the socket --------------------------------------------------------------------------------


async def test_socket_mode_and_owner_as_configured(sockdir: Path) -> None:
    cfg = kiosk_cfg(sockdir, mode=0o660, group=KIOSK_GID)
    async with serving(Services(), cfg) as server:
        st = os.lstat(server.path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o660
        assert (st.st_uid, st.st_gid) == (os.geteuid(), KIOSK_GID)
        assert sorted(p.name for p in sockdir.iterdir()) == ["k.sock"]  # no temporary left behind
    assert not cfg.socket.exists()  # removed at close

    cfg = kiosk_cfg(sockdir, mode=0o600)  # no group: the daemon's own
    async with serving(Services(), cfg) as server:
        st = os.lstat(server.path)
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_gid == os.getegid()


async def test_a_long_socket_path_still_gets_its_mode(sockdir: Path) -> None:
    # The temporary path next to it would exceed sun_path: bound through the directory's fd.
    deep = sockdir / ("d" * (100 - len(str(sockdir)) - 8))
    cfg = kiosk_cfg(deep, mode=0o640, group=KIOSK_GID)
    assert 100 <= len(str(cfg.socket)) <= 107
    async with serving(Services(), cfg) as server, clients(server.path) as (c,):
        st = os.lstat(cfg.socket)
        assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_gid == KIOSK_GID
        assert (await c.call("card.status"))["result"]["present"] is True
        assert sorted(p.name for p in deep.iterdir()) == ["k.sock"]


async def test_stale_socket_replaced_but_not_a_file_or_a_live_socket(sockdir: Path) -> None:
    cfg = kiosk_cfg(sockdir)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(cfg.socket))
    stale.close()  # bound, never listening: a crashed daemon's leftover
    async with serving(Services(), cfg) as server, clients(server.path) as (c,):
        assert "result" in await c.call("card.status")
        with pytest.raises(KioskError, match="another process is listening"):
            await KioskServer(Services(), cfg).start()
        assert "result" in await c.call("card.status")  # the live one was left alone
    cfg.socket.write_text("not a socket")
    with pytest.raises(KioskError, match="not a socket"):
        await KioskServer(Services(), cfg).start()
    assert cfg.socket.read_text() == "not a socket"


# --- methods -----------------------------------------------------------------------------------

EVERY_METHOD: list[tuple[str, dict[str, Any], str, dict[str, Any]]] = [
    ("card.status", {}, "card_status", {"present": True}),
    ("card.read_basic", {}, "read_basic", {"compat": "370200|370202199001011237|3|..."}),
    ("card.read", {"address": "DF04EF05|84|$"}, "card_read", {"auth": "key"}),
    ("card.read", {"address": "DF04EF05|84|$", "auth": "pin", "pin": GOOD}, "card_read", {"auth": "pin"}),
    ("pin.verify", {"pin": GOOD}, "pin_verify", {"verified": True, "keypad": False}),
    ("pin.verify", {}, "pin_verify", {"keypad": True}),
    ("pin.change", {"old": GOOD, "new": NEW, "new_again": NEW}, "pin_change", {"changed": True}),
    ("pin.change", {}, "pin_change", {"keypad": True}),
    ("account.query", {}, "account_query", {"balc": "1234.56"}),
    ("records.list", {"pin": GOOD}, "records_list", {"records": [{"seq": 1, "account": "12.50"}]}),
    ("card.activate", {"certno": CERTNO, "password": PORTAL_PW, "new_password": NEW_PW}, "card_activate",
     {"activated": True, "password_changed": True}),
    ("daemon.status", {}, "daemon_status", {"version": "test"}),
    ("daemon.reconcile", {"begin": "2024-05-01", "end": "2024-05-02"}, "daemon_reconcile",
     {"begin": "2024-05-01", "end": "2024-05-02"}),
    ("pin.unblock", {}, "pin_unblock", {"unblocked": True}),
    ("pin.reload", {"new_pin": NEW}, "pin_reload", {"reloaded": True}),
    ("events.subscribe", {}, "", {"subscribed": True}),
]


async def test_every_method(sockdir: Path) -> None:
    svc = Services()
    assert {m for m, *_ in EVERY_METHOD} == set(kiosk.KIOSK_METHODS) | set(kiosk.OPERATOR_METHODS)
    cfg = kiosk_cfg(sockdir, limits={"pin_attempts_per_card": 100})
    async with serving(svc, cfg) as server, clients(server.path) as (c,):
        for method, params, call, expect in EVERY_METHOD:
            doc = await c.call(method, params)
            assert set(doc) == {"jsonrpc", "id", "result"}, (method, doc)
            assert expect.items() <= doc["result"].items(), (method, doc)
            if call:
                assert svc.completed[-1] == call


async def test_application_errors_carry_the_named_error(sockdir: Path) -> None:
    async with serving(Services(), kiosk_cfg(sockdir)) as server, clients(server.path) as (c,):
        doc = await c.call("pin.verify", {"pin": WRONG})
        assert error_of(doc) == kiosk.APPLICATION_ERROR
        assert doc["error"]["message"] == "wrong PIN, 2 tries left"
        assert doc["error"]["data"] == SSCardError("PIN_WRONG", tries_left=2).to_dict()
        assert doc["error"]["data"]["compat_code"] == -51
        doc = await c.call("pin.change", {"old": GOOD, "new": NEW, "new_again": "11223344"})
        assert doc["error"]["data"]["code"] == "PIN_MISMATCH"
        doc = await c.call("card.read", {"address": "DF04EF05|84|"})
        assert doc["error"]["data"]["code"] == "BAD_PARAMETER"


async def test_internal_errors_are_answered_and_the_connection_goes_on(sockdir: Path) -> None:
    svc = Services()
    async with serving(svc, kiosk_cfg(sockdir)) as server, clients(server.path) as (c,):
        svc.fail_with = RuntimeError("a bug")
        doc = await c.call("card.status")
        assert error_of(doc) == kiosk.INTERNAL_ERROR and doc["error"]["data"]["code"] == "INTERNAL_ERROR"
        svc.fail_with = None
        svc.bad_result = ["not", "an", "object"]
        assert error_of(await c.call("card.status")) == kiosk.INTERNAL_ERROR
        svc.bad_result = {"amount": float("nan")}
        assert error_of(await c.call("card.status")) == kiosk.INTERNAL_ERROR
        svc.bad_result = None
        assert "result" in await c.call("card.status")


# --- framing and JSON-RPC errors ----------------------------------------------------------------

FRAMING: list[tuple[bytes, int, Any]] = [
    (b"{not json", kiosk.PARSE_ERROR, None),
    (b"\xff\xfe{}", kiosk.PARSE_ERROR, None),
    (b'{"jsonrpc":"2.0","id":1,"method":"card.status","method":"pin.unblock"}', kiosk.PARSE_ERROR, None),
    (b'{"jsonrpc":"2.0","id":1,"method":"card.status","params":{"x":NaN}}', kiosk.PARSE_ERROR, None),
    (b"[" + b"[" * 100000 + b"]" * 100000 + b"]", kiosk.PARSE_ERROR, None),
    (b'[{"jsonrpc":"2.0","id":1,"method":"card.status"}]', kiosk.INVALID_REQUEST, None),
    (b"[]", kiosk.INVALID_REQUEST, None),
    (b'"card.status"', kiosk.INVALID_REQUEST, None),
    (b'{"id":7,"method":"card.status"}', kiosk.INVALID_REQUEST, 7),
    (b'{"jsonrpc":"1.0","id":"a","method":"card.status"}', kiosk.INVALID_REQUEST, "a"),
    (b'{"jsonrpc":"2.0","id":8,"method":5}', kiosk.INVALID_REQUEST, 8),
    (b'{"jsonrpc":"2.0","id":9,"method":"card.status","extra":1}', kiosk.INVALID_REQUEST, 9),
    (b'{"jsonrpc":"2.0","id":1.5,"method":"card.status"}', kiosk.INVALID_REQUEST, None),
    (b'{"jsonrpc":"2.0","id":true,"method":"card.status"}', kiosk.INVALID_REQUEST, None),
    (b'{"jsonrpc":"2.0","id":{"a":1},"method":"card.status"}', kiosk.INVALID_REQUEST, None),
    (b'{"jsonrpc":"2.0","id":"' + b"x" * 129 + b'","method":"card.status"}', kiosk.INVALID_REQUEST, None),
    (b'{"jsonrpc":"2.0","id":10,"method":"card.status","params":3}', kiosk.INVALID_REQUEST, 10),
    (b'{"jsonrpc":"2.0","id":11,"method":"card.status","params":[]}', kiosk.INVALID_PARAMS, 11),
    (b'{"jsonrpc":"2.0","id":12,"method":"no.such"}', kiosk.METHOD_NOT_FOUND, 12),
    (b'{"jsonrpc":"2.0","id":null,"method":"no.such"}', kiosk.METHOD_NOT_FOUND, None),
]


@pytest.mark.parametrize(("line", "code", "rid"), FRAMING)
async def test_framing_errors(sockdir: Path, line: bytes, code: int, rid: Any) -> None:
    limits = {"max_line_bytes": 1 << 20}
    async with serving(Services(), kiosk_cfg(sockdir, limits=limits)) as server, clients(server.path) as (c,):
        await c.send_raw(line + b"\n")
        doc = await c.read()
        assert error_of(doc) == code and doc["id"] == rid
        assert "result" in await c.call("card.status")  # the connection goes on


async def test_method_not_found_does_not_echo_the_name(sockdir: Path) -> None:
    async with serving(Services(), kiosk_cfg(sockdir)) as server, clients(server.path) as (c,):
        doc = await c.call(GOOD)
        assert error_of(doc) == kiosk.METHOD_NOT_FOUND and GOOD not in json.dumps(doc)


INVALID_PARAMS: list[tuple[str, dict[str, Any], str | None]] = [
    ("card.status", {"x": 1}, "x"),
    ("card.status", {GOOD: 1}, None),  # a key that is not a name is not shown: it may be a value
    ("pin.verify", {"pin": "12a456"}, "pin"),
    ("pin.verify", {"pin": 246810}, "pin"),
    ("pin.verify", {"pin": "123"}, "pin"),
    ("pin.verify", {"pin": "1234567890123"}, "pin"),
    ("pin.change", {"old": GOOD, "new": NEW}, "new_again"),
    ("pin.change", {"old": GOOD, "new": "12x4", "new_again": "12x4"}, "new"),
    ("card.read", {}, "address"),
    ("card.read", {"address": "A" * 201}, "address"),
    ("card.read", {"address": "DF04EF05|84|$\n"}, "address"),
    ("card.read", {"address": "DF04EF05|84|$", "auth": "psam"}, "auth"),
    ("card.read", {"address": "DF04EF05|84|$", "pin": GOOD}, "pin"),
    ("records.list", {"pin": [GOOD]}, "pin"),
    ("card.activate", {"certno": "370202199001011238", "password": PORTAL_PW}, "certno"),
    ("card.activate", {"certno": CERTNO}, "password"),
    ("card.activate", {"certno": CERTNO, "password": "a\x07b"}, "password"),
    ("card.activate", {"certno": CERTNO, "password": PORTAL_PW, "new_password": "x" * 65}, "new_password"),
    ("daemon.reconcile", {"begin": "2024-02-30", "end": "2024-03-01"}, "begin"),
    ("daemon.reconcile", {"begin": "2024-03-02", "end": "2024-03-01"}, "end"),
    ("daemon.reconcile", {"begin": "20240301", "end": "2024-03-01"}, "begin"),
    ("pin.reload", {}, "new_pin"),
    ("events.subscribe", {"filter": "card"}, "filter"),
]


@pytest.mark.parametrize(("method", "params", "param"), INVALID_PARAMS)
async def test_invalid_params_name_the_param_never_the_value(
        sockdir: Path, method: str, params: dict[str, Any], param: str | None) -> None:
    svc = Services()
    async with serving(svc, kiosk_cfg(sockdir)) as server, clients(server.path) as (c,):
        doc = await c.call(method, params)
        assert error_of(doc) == kiosk.INVALID_PARAMS
        assert doc["error"]["data"]["param"] == param
        text = json.dumps(doc)
        for value in params.values():
            if isinstance(value, str) and value not in ("", param):
                assert value not in text
        assert GOOD not in text and CERTNO[:17] not in text
        assert svc.started == []  # nothing reached the daemon


async def test_notifications_get_no_answer_and_lines_are_served_in_order(sockdir: Path) -> None:
    svc = Services()
    async with serving(svc, kiosk_cfg(sockdir)) as server, clients(server.path) as (c,):
        batch = b"".join([
            b'{"jsonrpc":"2.0","method":"card.status"}\n',  # a notification: runs, no answer
            b"\n  \r\n",  # blank lines are skipped
            b'{"jsonrpc":"2.0","method":"no.such"}\n',  # a notification's error: no answer either
            b'{"jsonrpc":"2.0","id":"a","method":"pin.verify","params":{"pin":"' + GOOD.encode() + b'"}}\r\n',
            b'{"jsonrpc":"2.0","id":"b","method":"account.query"}',  # the last line needs no newline
        ])
        await c.send_raw(batch)
        c.writer.write_eof()
        assert (await c.read())["id"] == "a"
        assert (await c.read())["id"] == "b"
        assert await c.eof()
        assert svc.completed == ["card_status", "pin_verify", "account_query"]


# --- limits ------------------------------------------------------------------------------------


async def test_oversize_line_is_refused_and_the_connection_closed(sockdir: Path) -> None:
    cfg = kiosk_cfg(sockdir, limits={"max_line_bytes": 256})
    async with serving(Services(), cfg) as server, clients(server.path, 3) as (a, b, c):
        # Exactly the limit is fine.
        line = b'{"jsonrpc":"2.0","id":1,"method":"card.status"}'
        await a.send_raw(line + b" " * (256 - len(line)) + b"\n")
        assert "result" in await a.read()
        # One byte more: refused once it has come, without waiting for the newline.
        await b.send_raw(b"{" + b" " * 256)
        doc = await b.read()
        assert error_of(doc) == kiosk.LINE_TOO_LONG and doc["id"] is None
        assert doc["error"]["data"] == {"max_line_bytes": 256}
        assert await b.eof()

        # A client that never stops sending: answered and cut off, not buffered without bound.
        async def flood() -> None:
            with contextlib.suppress(OSError):
                for _ in range(1000):
                    await c.send_raw(b"x" * 65536)

        flooding = asyncio.create_task(flood())
        # The answer may be lost to the client's own broken pipe; the connection is closed either way.
        with contextlib.suppress(OSError):
            assert error_of(await c.read()) == kiosk.LINE_TOO_LONG
        async with asyncio.timeout(5):
            await flooding
        assert server.status()["connections"] == 1
        assert "result" in await a.call("card.status")


async def test_max_connections(sockdir: Path) -> None:
    """Kiosk peers fill max_connections; operators (root here) are not counted, so a full house
    of kiosks never locks the service hall out."""
    cfg = kiosk_cfg(sockdir, mode=0o666, limits={"max_connections": 2}, allowed_uids=frozenset({NOBODY}))
    async with serving(Services(), cfg) as server:
        a, b = await Child.start(server.path), await Child.start(server.path)
        try:
            assert '"result"' in await a.ask("card.status")
            assert '"result"' in await b.ask("card.status")
            c = await Child.start(server.path)
            lines = await c.finish()
            assert str(kiosk.TOO_MANY_CONNECTIONS) in lines[0] and lines[-1] == "EOF", lines
            async with clients(server.path) as (op,):  # root: an operator, not counted
                assert "result" in await op.call("daemon.status")
            await a.finish()
            for _ in range(100):  # the server notices a's end
                if server.status()["connections"] < 2:
                    break
                await asyncio.sleep(0.01)
            d = await Child.start(server.path)
            assert '"result"' in await d.ask("card.status")
            await d.finish()
        finally:
            for child in (a, b):
                child.kill()


async def test_a_reload_that_removes_a_peer_cuts_its_subscription(sockdir: Path) -> None:
    cfg = kiosk_cfg(sockdir, mode=0o666, allowed_uids=frozenset({NOBODY}))
    async with serving(Services(), cfg) as server:
        sub = await Child.start(server.path)
        try:
            assert '"result"' in await sub.ask("events.subscribe")
            assert server.status()["subscribers"] == 1
            server.update_config(kiosk_cfg(sockdir, mode=0o666))  # NOBODY no longer listed
            assert server.status()["connections"] == 0 and server.status()["subscribers"] == 0
            assert (await sub.finish())[-1] == "EOF"
        finally:
            sub.kill()


async def test_max_requests_per_connection(sockdir: Path) -> None:
    cfg = kiosk_cfg(sockdir, limits={"max_requests_per_connection": 3})
    async with serving(Services(), cfg) as server, clients(server.path) as (c,):
        for _ in range(3):
            assert "result" in await c.call("card.status")
        assert await c.eof()


async def test_idle_timeout_but_not_for_a_subscriber(sockdir: Path) -> None:
    svc = Services()
    cfg = kiosk_cfg(sockdir, limits={"idle_timeout": 0.3})
    async with serving(svc, cfg) as server, clients(server.path, 2) as (idle, sub):
        assert "result" in await sub.call("events.subscribe")
        t0 = time.monotonic()
        assert await idle.eof()
        assert 0.25 <= time.monotonic() - t0 < 3
        await asyncio.sleep(0.3)
        svc.emit("card_inserted")
        assert (await sub.read())["params"]["event"] == "card_inserted"


# --- peers -------------------------------------------------------------------------------------


async def test_a_peer_not_allowed_is_refused_and_logged(sockdir: Path) -> None:
    svc = Services()
    cfg = kiosk_cfg(sockdir, mode=0o660, group=KIOSK_GID, allowed_uids=frozenset({1000}))
    async with serving(svc, cfg) as server:
        with capture_logs() as logs:
            out = await run_as(server.path, [{"method": "card.status"}])
        assert error_of(json.loads(out[0])) == kiosk.PEER_NOT_ALLOWED
        assert json.loads(out[0])["error"]["message"] == "peer not allowed"
        assert out[-1] == "EOF"
        refused = [e for e in logs if e["event"] == "kiosk peer not allowed"]
        assert refused and refused[0]["uid"] == NOBODY and refused[0]["gid"] == KIOSK_GID
        assert refused[0]["pid"] > 0
        assert svc.started == []


async def test_the_socket_mode_keeps_others_out(sockdir: Path) -> None:
    # Not in the socket's group: the file system refuses before the daemon sees anything.
    cfg = kiosk_cfg(sockdir, mode=0o660, group=KIOSK_GID, allowed_uids=frozenset({NOBODY}))
    async with serving(Services(), cfg) as server:
        out = await run_as(server.path, [], gid=NOBODY)
        assert out[0] == "CONNECT-FAILED EACCES"


@pytest.mark.parametrize(("allow", "gid", "groups"), [
    ({"allowed_uids": frozenset({NOBODY})}, KIOSK_GID, ()),
    ({"allowed_gids": frozenset({KIOSK_GID})}, KIOSK_GID, ()),  # primary group
    ({"allowed_gids": frozenset({KIOSK_GID})}, NOBODY, (KIOSK_GID,)),  # supplementary group
])
async def test_allowed_peers_by_uid_or_group(sockdir: Path, allow: dict[str, Any], gid: int,
                                             groups: tuple[int, ...]) -> None:
    cfg = kiosk_cfg(sockdir, mode=0o660, group=KIOSK_GID, **allow)
    async with serving(Services(), cfg) as server:
        out = await run_as(server.path, [{"method": "card.status"}, {"method": "daemon.status"}],
                           gid=gid, groups=groups)
        assert json.loads(out[0])["result"]["present"] is True
        assert error_of(json.loads(out[1])) == kiosk.OPERATOR_REFUSED  # kiosk, not operator
        assert out[-1] == "EOF"


@pytest.mark.parametrize("method", kiosk.OPERATOR_METHODS)
async def test_operator_methods_refused_to_kiosk_uids(sockdir: Path, method: str) -> None:
    svc = Services()
    cfg = kiosk_cfg(sockdir, mode=0o660, group=KIOSK_GID, allowed_uids=frozenset({NOBODY}))
    params = dict(next(p for m, p, *_ in EVERY_METHOD if m == method))
    async with serving(svc, cfg) as server:
        out = await run_as(server.path, [{"method": method, "params": params}])
        doc = json.loads(out[0])
        assert error_of(doc) == kiosk.OPERATOR_REFUSED
        assert doc["error"]["message"] == "operator method refused"
        assert svc.started == []


@pytest.mark.parametrize(("allow", "groups"), [
    ({"operator_uids": frozenset({NOBODY})}, ()),
    ({"operator_gids": frozenset({4242})}, (4242,)),
])
async def test_operators_may_call_everything(sockdir: Path, allow: dict[str, Any],
                                             groups: tuple[int, ...]) -> None:
    # An operator need not be on the kiosk lists as well.
    cfg = kiosk_cfg(sockdir, mode=0o660, group=KIOSK_GID, **allow)
    async with serving(Services(), cfg) as server:
        out = await run_as(server.path, [{"method": "daemon.status"}, {"method": "card.status"},
                                         {"method": "pin.unblock"}], groups=groups)
        assert [("result" in json.loads(x)) for x in out[:3]] == [True, True, True]


async def test_a_reload_applies_to_open_connections(sockdir: Path) -> None:
    cfg = kiosk_cfg(sockdir, mode=0o660, group=KIOSK_GID, allowed_uids=frozenset({NOBODY}))
    async with serving(Services(), cfg) as server, child(server.path) as c:
        assert "result" in json.loads(await c.ask("card.status"))
        assert error_of(json.loads(await c.ask("daemon.status"))) == kiosk.OPERATOR_REFUSED
        server.update_config(kiosk_cfg(sockdir, mode=0o660, group=KIOSK_GID,
                                       operator_uids=frozenset({NOBODY}), allowed_uids=frozenset({NOBODY})))
        assert "result" in json.loads(await c.ask("daemon.status"))
        server.update_config(kiosk_cfg(sockdir, mode=0o660, group=KIOSK_GID))  # closed at once
        assert await c.ask("card.status") in ("EOF", "")


# --- PIN rate limits ---------------------------------------------------------------------------


async def test_pin_attempts_limited_per_client_across_connections(sockdir: Path) -> None:
    svc = Services()
    cfg = kiosk_cfg(sockdir, limits={"pin_attempts_per_client": 3, "pin_attempts_per_card": 100,
                                     "pin_attempt_window": 0.5})
    async with serving(svc, cfg) as server:
        async with clients(server.path) as (a,):
            assert error_of(await a.call("pin.verify", {"pin": WRONG})) == kiosk.APPLICATION_ERROR
            assert "result" in await a.call("pin.verify", {"pin": GOOD})  # successes count too
        async with clients(server.path) as (b,):  # reconnecting does not reset the count
            assert "result" in await b.call("records.list", {"pin": GOOD})
            before = list(svc.started)
            doc = await b.call("pin.change", {"old": GOOD, "new": NEW, "new_again": NEW})
            assert error_of(doc) == kiosk.RATE_LIMITED
            assert doc["error"]["data"]["scope"] == "client" and doc["error"]["data"]["retry_after"] >= 1
            assert svc.started == before  # refused without touching the card
            # Calls without a PIN are not attempts.
            assert "result" in await b.call("card.read", {"address": "DF04EF05|84|$"})
            assert "result" in await b.call("card.status")
            await asyncio.sleep(0.55)  # the window slides
            assert "result" in await b.call("pin.verify", {"pin": GOOD})


async def test_pin_attempts_limited_per_card(sockdir: Path) -> None:
    svc = Services()
    cfg = kiosk_cfg(sockdir, limits={"pin_attempts_per_client": 100, "pin_attempts_per_card": 2})
    async with serving(svc, cfg) as server, clients(server.path, 2) as (a, b):
        assert "result" in await a.call("card.read", {"address": "DF04EF05|84|$", "auth": "pin", "pin": GOOD})
        assert "error" in await b.call("card.activate", {"certno": CERTNO, "password": "wrong-one"})
        doc = await a.call("pin.verify", {})  # the keypad is an attempt too
        assert error_of(doc) == kiosk.RATE_LIMITED and doc["error"]["data"]["scope"] == "card"
        # pin.reload (operator) sets a PIN and guesses nothing: not limited.
        assert "result" in await b.call("pin.reload", {"new_pin": NEW})
        svc.card_no = "Q10000011"  # another card
        assert "result" in await b.call("pin.verify", {"pin": GOOD})
        svc.card_no = None  # no card: only the client counts
        assert "result" in await b.call("pin.verify", {"pin": GOOD})


async def test_concurrent_attempts_cannot_overshoot_the_limit(sockdir: Path) -> None:
    svc = Services()
    svc.delay = 0.05
    cfg = kiosk_cfg(sockdir, limits={"pin_attempts_per_client": 3})
    async with serving(svc, cfg) as server, clients(server.path, 8) as cs:
        docs = await asyncio.gather(*(c.call("pin.verify", {"pin": GOOD}) for c in cs))
        assert sum("result" in d for d in docs) == 3
        assert sum(error_of(d) == kiosk.RATE_LIMITED for d in docs if "error" in d) == 5


# --- concurrency, dying clients, closing -------------------------------------------------------


async def test_several_clients_at_once_and_one_call_at_a_time_per_connection(sockdir: Path) -> None:
    svc = Services()
    svc.delay = 0.2
    async with serving(svc, kiosk_cfg(sockdir)) as server, clients(server.path, 8) as cs:
        t0 = time.monotonic()
        docs = await asyncio.gather(*(c.call("card.status") for c in cs))
        assert all("result" in d for d in docs)
        assert time.monotonic() - t0 < 1.0  # 8 × 0.2 s one after another would be 1.6 s
        assert svc.max_active == 8
        svc.max_active = 0
        one = cs[0]
        for i in range(3):  # pipelined on one connection: served one after the other
            await one.send("card.status", rid=100 + i)
        assert [(await one.read())["id"] for _ in range(3)] == [100, 101, 102]
        assert svc.max_active == 1


async def test_a_client_dying_mid_call_leaves_the_call_to_finish(sockdir: Path) -> None:
    svc = Services()
    gate = svc.gates["pin_verify"] = asyncio.Event()
    async with serving(svc, kiosk_cfg(sockdir)) as server:
        with capture_logs() as logs:
            async with clients(server.path) as (c,):
                await c.send("pin.verify", {"pin": GOOD})
                for _ in range(100):
                    if svc.started:
                        break
                    await asyncio.sleep(0.01)
                assert svc.started == ["pin_verify"]
                c.writer.transport.abort()  # the kiosk process dies
            await asyncio.sleep(0.1)
            assert svc.completed == []  # not cut short
            gate.set()
            for _ in range(100):
                if svc.completed:
                    break
                await asyncio.sleep(0.01)
            assert svc.completed == ["pin_verify"]
            for _ in range(100):
                if server.status()["connections"] == 0:
                    break
                await asyncio.sleep(0.01)
            assert server.status() | {"socket": ""} == {"socket": "", "listening": True, "connections": 0,
                                                       "subscribers": 0, "calls_in_flight": 0}
        done = [e for e in logs if e["event"] == "kiosk request" and e["method"] == "pin.verify"]
        assert done and done[0]["outcome"] == "ok"
        async with clients(server.path) as (d,):  # the server is fine
            assert "result" in await d.call("card.status")


async def test_a_subprocess_client_killed_mid_call(sockdir: Path) -> None:
    svc = Services()
    gate = svc.gates["pin_change"] = asyncio.Event()
    async with serving(svc, kiosk_cfg(sockdir)) as server, child(server.path, uid=0, gid=0) as c:
        assert c.proc.stdin is not None
        doc = {"jsonrpc": "2.0", "id": 1, "method": "pin.change",
               "params": {"old": GOOD, "new": NEW, "new_again": NEW}}
        c.proc.stdin.write(json.dumps(doc).encode() + b"\n")
        await c.proc.stdin.drain()
        for _ in range(500):
            if svc.started:
                break
            await asyncio.sleep(0.01)
        c.kill()
        await c.proc.wait()
        gate.set()
        for _ in range(100):
            if svc.completed:
                break
            await asyncio.sleep(0.01)
        assert svc.completed == ["pin_change"]


async def test_close_waits_for_calls_in_flight(sockdir: Path) -> None:
    svc = Services()
    gate = svc.gates["pin_verify"] = asyncio.Event()
    server = KioskServer(svc, kiosk_cfg(sockdir))
    await server.start()
    try:
        async with clients(server.path) as (c,):
            await c.send("pin.verify", {"pin": GOOD})
            for _ in range(100):
                if svc.started:
                    break
                await asyncio.sleep(0.01)
            closing = asyncio.create_task(server.close())
            await asyncio.sleep(0.1)
            assert not closing.done() and not server.path.exists()  # not accepting any more...
            gate.set()
            await asyncio.wait_for(closing, 5)
            assert svc.completed == ["pin_verify"]  # ...but the card operation finished
            assert "result" in await c.read()  # and its answer was delivered before the close
            assert await c.eof()
    finally:
        await server.close()


# --- events ------------------------------------------------------------------------------------


async def test_events_reach_every_subscriber_between_answers(sockdir: Path) -> None:
    svc = Services()
    async with serving(svc, kiosk_cfg(sockdir)) as server, clients(server.path, 3) as (a, b, other):
        assert (await a.call("events.subscribe"))["result"] == {"subscribed": True}
        assert "result" in await b.call("events.subscribe")
        assert "result" in await a.call("events.subscribe")  # twice: still one subscription
        assert len(svc.listeners) == 2
        svc.emit("card_inserted")
        for c in (a, b):
            doc = await c.read()
            assert doc == {"jsonrpc": "2.0", "method": "event",
                           "params": {"event": "card_inserted", "reader": "emulated",
                                      "at": "2024-05-01T10:00:00+08:00"}}
        # A call on a subscribed connection; an event from another thread meanwhile.
        svc.delay = 0.1
        rid = await a.send("card.status")
        t = threading.Thread(target=svc.emit, args=("card_removed",))
        t.start()
        t.join()
        got = [await a.read(), await a.read()]
        assert {d.get("method") or d["id"] for d in got} == {"event", rid}
        assert (await b.read())["params"]["event"] == "card_removed"
        a.close()
        for _ in range(100):
            if len(svc.listeners) == 1:
                break
            await asyncio.sleep(0.01)
        assert len(svc.listeners) == 1  # the closed connection's listener is gone
        with pytest.raises(TimeoutError):
            await other.read(timeout=0.1)  # not subscribed: no events


# --- socat: an independent client --------------------------------------------------------------


def _socat() -> str:
    path = shutil.which("socat")
    if path is None:
        pytest.skip("socat is not installed (apt-get install socat)")
    return path


async def test_socat_as_an_independent_client(sockdir: Path) -> None:
    socat = _socat()
    svc = Services()
    async with serving(svc, kiosk_cfg(sockdir, limits={"max_line_bytes": 256})) as server:
        lines = (b'{"jsonrpc":"2.0","id":1,"method":"card.read_basic"}\n'
                 b'{"jsonrpc":"2.0","id":2,"method":"pin.verify","params":{"pin":"%s"}}\n'
                 b'{"jsonrpc":"2.0","id":3,"method":"card.status"\n'
                 b'{"jsonrpc":"2.0","id":4,"method":"daemon.status"}\n' % WRONG.encode()
                 + b"x" * 300 + b"\n")
        proc = await asyncio.create_subprocess_exec(socat, "-t", "5", "-", f"UNIX-CONNECT:{server.path}",
                                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        out, _ = await asyncio.wait_for(proc.communicate(lines), 10)
        docs = [json.loads(x) for x in out.splitlines()]
        assert docs[0]["result"]["compat"].startswith("370200|")
        assert docs[1]["error"]["data"]["code"] == "PIN_WRONG"
        assert error_of(docs[2]) == kiosk.PARSE_ERROR
        assert docs[3]["result"]["version"] == "test"  # root is an operator
        assert error_of(docs[4]) == kiosk.LINE_TOO_LONG
        assert len(docs) == 5


async def test_socat_as_a_user_not_allowed(sockdir: Path) -> None:
    socat = _socat()
    cfg = kiosk_cfg(sockdir, mode=0o660, group=KIOSK_GID)
    async with serving(Services(), cfg) as server:
        proc = await asyncio.create_subprocess_exec(
            socat, "-t", "5", "-", f"UNIX-CONNECT:{server.path}", user=NOBODY, group=KIOSK_GID,
            extra_groups=[], stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd="/")
        # Nothing sent: socat would stop at its own broken pipe before printing the refusal.
        out, _ = await asyncio.wait_for(proc.communicate(b""), 10)
        assert [error_of(json.loads(x)) for x in out.splitlines()] == [kiosk.PEER_NOT_ALLOWED]


# --- sscardctl ---------------------------------------------------------------------------------


async def sscardctl(*args: str, stdin: bytes = b"",
                    env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sscardd.ctl", *args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, cwd=ROOT, env={**os.environ, **(env or {})})
    out, err = await asyncio.wait_for(proc.communicate(stdin), 20)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_sscardctl(sockdir: Path) -> None:
    svc = Services()
    async with serving(svc, kiosk_cfg(sockdir)) as server:
        sock = str(server.path)
        rc, out, _ = await sscardctl("--socket", sock, "card.read_basic")
        assert rc == 0 and json.loads(out)["compat"].startswith("370200|")
        rc, out, _ = await sscardctl("card.read", "address=DF04EF05|84|$", env={"SSCARDD_SOCKET": sock})
        assert rc == 0 and json.loads(out)["auth"] == "key"
        rc, out, _ = await sscardctl("--socket", sock, "daemon.reconcile",
                                     '{"begin": "2024-05-01", "end": "2024-05-01"}')
        assert rc == 0 and json.loads(out)["agree"] is True
        rc, out, err = await sscardctl("--socket", sock, "pin.verify", "--pin-stdin",
                                       stdin=f"{GOOD}\n".encode())
        assert rc == 0 and json.loads(out) == {"verified": True, "keypad": False}
        rc, out, err = await sscardctl("--socket", sock, "pin.verify", "--pin-stdin",
                                       stdin=f"{WRONG}\n".encode())
        assert rc == 1 and json.loads(out)["error"]["data"]["code"] == "PIN_WRONG"
        assert "PIN_WRONG (-51)" in err and WRONG not in out + err
        rc, out, _ = await sscardctl("--socket", sock, "pin.change", "--pin-stdin",
                                     stdin=f"{GOOD}\n{NEW}\n{NEW}\n".encode())
        assert rc == 0 and json.loads(out)["changed"] is True
        rc, out, _ = await sscardctl("--socket", sock, "--compact", "pin.change", "--keypad")
        assert rc == 0 and out.strip() == '{"changed": true, "keypad": true}'
        rc, out, _ = await sscardctl("--socket", sock, "card.activate", "--pin-stdin",
                                     stdin=f"{CERTNO}\n{PORTAL_PW}\n\n".encode())
        assert rc == 0 and json.loads(out) == {"activated": True, "password_changed": False}
        # PINs never on the command line.
        rc, out, err = await sscardctl("--socket", sock, "pin.verify", f"pin={GOOD}")
        assert rc == 2 and "never on the command line" in err and GOOD not in out + err
        rc, _, err = await sscardctl("--socket", sock, "pin.verify", "--pin-stdin")
        assert rc == 2 and "expected 1 line" in err
        rc, _, err = await sscardctl("--socket", sock, "card.status", GOOD)
        assert rc == 2 and GOOD not in err
        rc, out, _ = await sscardctl("--socket", sock, "no.such")
        assert rc == 1 and json.loads(out)["error"]["code"] == kiosk.METHOD_NOT_FOUND
        rc, out, _ = await sscardctl("--methods")
        assert rc == 0 and "pin.reload  (operator)" in out.splitlines()
        # Events: two printed, then it stops.
        proc = asyncio.create_task(sscardctl("--socket", sock, "--events", "--count", "2"))
        for _ in range(500):
            if svc.listeners:
                break
            await asyncio.sleep(0.01)
        svc.emit("card_inserted")
        svc.emit("card_removed")
        rc, out, _ = await proc
        assert rc == 0
        assert [json.loads(x)["event"] for x in out.splitlines()] == ["card_inserted", "card_removed"]
    rc, _, err = await sscardctl("--socket", str(sockdir / "none.sock"), "card.status")
    assert rc == 3 and "cannot reach the daemon" in err


# --- logs --------------------------------------------------------------------------------------


async def test_logs_carry_no_secret(sockdir: Path) -> None:
    svc = Services()
    async with serving(svc, kiosk_cfg(sockdir)) as server, clients(server.path) as (c,):
        with capture_logs() as logs:
            await c.call("pin.verify", {"pin": GOOD})
            await c.call("pin.verify", {"pin": WRONG})
            await c.call("pin.change", {"old": GOOD, "new": NEW, "new_again": NEW})
            await c.call("records.list", {"pin": WRONG})
            await c.call("card.activate", {"certno": CERTNO, "password": PORTAL_PW, "new_password": NEW_PW})
            await c.call("pin.reload", {"new_pin": NEW})
            await c.call("pin.verify", {"pin": "12x456"})
            await c.call(GOOD)
    requests = [e for e in logs if e["event"] == "kiosk request"]
    assert len(requests) == 8
    assert {e["outcome"] for e in requests} == {"ok", "PIN_WRONG", str(kiosk.INVALID_PARAMS),
                                                str(kiosk.METHOD_NOT_FOUND)}
    for e in requests:
        assert set(e) <= {"event", "log_level", "method", "uid", "pid", "outcome", "ms", "delivered"}
    text = repr(logs)
    for secret in SECRETS:
        assert secret not in text
