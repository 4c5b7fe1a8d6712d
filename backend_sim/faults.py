"""Fault controls for tests, kept in the shared ledger so they act on whichever instance gets the
request, and so a test, the ``sscard-backend fault`` command or the MQTT control topic can arm them.

Kinds (each matches an ``infno`` and/or a terminal id when given, and is used up after ``count``
requests):

* ``fail``: answer ``INJECTED_FAILURE`` without processing or storing anything (as if the backend
  had crashed before its transaction); a resend of the same ``msgid`` is processed normally;
* ``hold``: hold the request *before* processing it until released (its expiry is checked when
  it is processed, after the release);
* ``hold_answer``: process the request, then hold its answer until released;
* ``delay``: process the request, then publish its answer ``seconds`` later;
* ``drop``: process the request and never publish its answer.

A held request is listed in ``held`` (with the instance holding it) until released, so a test can
wait for the hold instead of sleeping.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backend_sim.envelope import fmt_time_ms, now_beijing

KINDS = ("fail", "hold", "hold_answer", "delay", "drop")


@dataclass(frozen=True)
class Fault:
    id: int
    kind: str
    infno: str | None
    terminal_id: str | None
    remaining: int
    seconds: float


class Faults:
    """The fault table of a ledger file (its own connection; safe to use from one thread at a time)."""

    def __init__(self, path: str | Path, busy_timeout_ms: int = 30_000) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"{self.path}: no such ledger")
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                  timeout=busy_timeout_ms / 1000)
        self.db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        self.db.execute("PRAGMA synchronous = FULL")
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self.db.close()

    def _write(self, sql: str, args: tuple[Any, ...] | list[Any] = ()) -> sqlite3.Cursor:
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                cur = self.db.execute(sql, args)
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")
            return cur

    def arm(self, kind: str, *, infno: str | None = None, terminal_id: str | None = None, count: int = 1,
            seconds: float = 0.0) -> int:
        if kind not in KINDS:
            raise ValueError(f"fault kind must be one of {', '.join(KINDS)}")
        if not 1 <= count <= 1_000_000:
            raise ValueError("count must be from 1 to 1000000")
        if not 0 <= seconds <= 3600:
            raise ValueError("seconds must be from 0 to 3600")
        cur = self._write("INSERT INTO fault (kind, infno, terminal_id, remaining, seconds, created_at)"
                          " VALUES (?, ?, ?, ?, ?, ?)",
                          (kind, infno, terminal_id, count, seconds, fmt_time_ms(now_beijing())))
        return int(cur.lastrowid or 0)

    def armed(self) -> bool:
        """Cheap check (a read, no write transaction) for the request path."""
        with self._lock:
            return self.db.execute("SELECT 1 FROM fault WHERE remaining > 0 LIMIT 1").fetchone() is not None

    def take(self, kind: str, infno: str | None, terminal_id: str | None) -> Fault | None:
        """Use up one count of the oldest fault of ``kind`` matching this request, if any."""
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                row = self.db.execute(
                    "SELECT id, kind, infno, terminal_id, remaining, seconds FROM fault WHERE kind = ?"
                    " AND remaining > 0 AND (infno IS NULL OR infno = ?)"
                    " AND (terminal_id IS NULL OR terminal_id = ?)"
                    " ORDER BY id LIMIT 1", (kind, infno, terminal_id)).fetchone()
                if row is not None:
                    self.db.execute("UPDATE fault SET remaining = remaining - 1 WHERE id = ?", (row[0],))
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")
        return None if row is None else Fault(*row)

    def hold(self, kind: str, terminal_id: str, msgid: str | None, infno: str | None, instance: str) -> int:
        cur = self._write("INSERT INTO held (kind, terminal_id, msgid, infno, instance, held_at)"
                          " VALUES (?,?,?,?,?,?)",
                          (kind, terminal_id, msgid, infno, instance, fmt_time_ms(now_beijing())))
        return int(cur.lastrowid or 0)

    def is_released(self, held_id: int) -> bool:
        with self._lock:
            row = self.db.execute("SELECT released FROM held WHERE id = ?", (held_id,)).fetchone()
        return row is None or bool(row[0])

    def release(self, *, infno: str | None = None, msgid: str | None = None,
                terminal_id: str | None = None, kind: str | None = None) -> int:
        """Release the held requests (or answers) matching every given filter; returns how many."""
        sql = "UPDATE held SET released = 1 WHERE released = 0"
        args: list[Any] = []
        for col, val in (("infno", infno), ("msgid", msgid), ("terminal_id", terminal_id), ("kind", kind)):
            if val is not None:
                sql += f" AND {col} = ?"
                args.append(val)
        return self._write(sql, args).rowcount

    def held(self, *, include_released: bool = False) -> list[dict[str, Any]]:
        sql = "SELECT id, kind, terminal_id, msgid, infno, instance, held_at, released FROM held"
        if not include_released:
            sql += " WHERE released = 0"
        with self._lock:
            rows = self.db.execute(sql + " ORDER BY id").fetchall()
        keys = ("id", "kind", "terminal_id", "msgid", "infno", "instance", "held_at", "released")
        return [dict(zip(keys, r, strict=True)) for r in rows]

    def faults(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = self.db.execute("SELECT id, kind, infno, terminal_id, remaining, seconds, created_at"
                                   " FROM fault WHERE remaining > 0 ORDER BY id").fetchall()
        keys = ("id", "kind", "infno", "terminal_id", "remaining", "seconds", "created_at")
        return [dict(zip(keys, r, strict=True)) for r in rows]

    def clear(self) -> int:
        """Disarm every fault and release everything held; returns how many holds were released."""
        self._write("DELETE FROM fault")
        return self.release()

    def wait_held(self, *, infno: str | None = None, msgid: str | None = None, kind: str | None = None,
                  timeout: float = 10.0) -> dict[str, Any]:
        """Block until a matching request (or answer) is held; returns its row (TimeoutError otherwise)."""
        deadline = time.monotonic() + timeout
        while True:
            for h in self.held():
                if ((infno is None or h["infno"] == infno) and (msgid is None or h["msgid"] == msgid)
                        and (kind is None or h["kind"] == kind)):
                    return h
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing held matching infno={infno} msgid={msgid} kind={kind}")
            time.sleep(0.01)
