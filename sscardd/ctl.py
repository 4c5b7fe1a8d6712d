"""``sscardctl``: call a method of the running daemon's local socket and print the answer.

    sscardctl [--socket PATH] [--timeout S] [--compact] METHOD [PARAMS] [--pin-stdin | --keypad]
    sscardctl [--socket PATH] --events [--count N]
    sscardctl --methods

PARAMS: one JSON object (``'{"address": "DF04EF05|84|$"}'``), or ``key=value`` pairs (the value a
string) and ``key:=JSON`` pairs (the value JSON: ``count:=3``). Examples::

    sscardctl card.status
    sscardctl card.read_basic
    sscardctl card.read address='DF04EF05|84|$'
    sscardctl pin.verify                      (prompts for the PIN)
    printf '246810\\n' | sscardctl pin.verify --pin-stdin
    sscardctl pin.change --keypad             (the reader's keypad)
    sscardctl daemon.reconcile begin=2024-05-01 end=2024-05-01
    sscardctl --events --count 2

PINs, passwords and ID numbers are never taken from the command line (other users see it in
``ps``): sscardctl asks for them (without echo), or reads them from standard input, one per line,
with ``--pin-stdin``, in this order: ``pin.verify``, ``records.list``, ``card.read`` with
``auth=pin``: the PIN; ``pin.change``: old, new, new again; ``pin.reload``: the new PIN;
``card.activate``: the ID number, the portal password, the new portal password (an empty or
missing line: none). ``--keypad`` sends no PIN: the reader's keypad is used.

The socket: ``--socket``, else ``$SSCARDD_SOCKET``, else ``/run/sscardd/kiosk.sock``. The result is
printed as JSON on standard output; an error answer as ``{"error": {...}}`` on standard output and
a one-line summary on standard error. ``--events`` prints each event as one JSON line.

Exit codes: 0 success; 1 the daemon answered with an error (including "peer not allowed" and
"operator method refused"); 2 bad usage; 3 the daemon cannot be reached (no socket, connection
refused, no permission); 4 the connection broke, timed out, or the answer was not understood;
130 interrupted.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import socket
import sys
from typing import IO, Any, NoReturn

from sscardd import __version__
from sscardd.jsonwire import dumps, loads
from sscardd.kiosk import KIOSK_METHODS, OPERATOR_METHODS, SECRET_PARAMS

DEFAULT_SOCKET = "/run/sscardd/kiosk.sock"
MAX_ANSWER = 16 << 20
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_BROKEN, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130

# The secret params of each method, in the order they are asked for: (name, prompt, optional).
_SECRETS: dict[str, list[tuple[str, str, bool]]] = {
    "pin.verify": [("pin", "PIN: ", False)],
    "records.list": [("pin", "PIN: ", False)],
    "card.read": [("pin", "PIN: ", False)],
    "pin.change": [("old", "old PIN: ", False), ("new", "new PIN: ", False),
                   ("new_again", "new PIN again: ", False)],
    "pin.reload": [("new_pin", "new PIN: ", False)],
    "card.activate": [("certno", "ID number: ", False), ("password", "portal password: ", False),
                      ("new_password", "new portal password (empty: none): ", True)],
}
_KEYPAD_METHODS = ("pin.verify", "records.list", "card.read", "pin.change")


class Broken(Exception):
    """The connection broke or the answer was not understood (exit 4)."""


class Usage(Exception):
    """Bad usage (exit 2)."""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sscardctl", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--socket", default=None, metavar="PATH",
                    help=f"the daemon's socket (default $SSCARDD_SOCKET or {DEFAULT_SOCKET})")
    ap.add_argument("--timeout", type=float, default=120.0, metavar="S",
                    help="seconds to wait for the answer (default 120: PIN entry on a keypad takes time)")
    ap.add_argument("--compact", action="store_true", help="print the answer on one line")
    ap.add_argument("--pin-stdin", action="store_true", help="read PINs/passwords from stdin, one per line")
    ap.add_argument("--keypad", action="store_true", help="send no PIN: the reader's keypad is used")
    ap.add_argument("--events", action="store_true", help="subscribe and print events until interrupted")
    ap.add_argument("--count", type=int, default=None, metavar="N", help="with --events: stop after N events")
    ap.add_argument("--methods", action="store_true", help="list the methods and exit")
    ap.add_argument("--version", action="version", version=f"sscardctl {__version__}")
    ap.add_argument("method", nargs="?", help="e.g. card.status, pin.verify, daemon.status")
    ap.add_argument("params", nargs="*", help="a JSON object, or key=value / key:=JSON pairs")
    return ap


def parse_params(items: list[str]) -> dict[str, Any]:
    """The params object from the command line (Usage on anything malformed)."""
    if len(items) == 1 and items[0].lstrip().startswith("{"):
        try:
            obj = loads(items[0])
        except ValueError:
            raise Usage("the params are not a valid JSON object") from None
        if not isinstance(obj, dict):
            raise Usage("the params must be a JSON object")
        return obj
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise Usage(f"expected key=value or key:=JSON, got an argument without '=' ({len(item)} chars)")
        if key.endswith(":"):
            key = key[:-1]
            try:
                out_value: Any = loads(value)
            except ValueError:
                raise Usage(f"{key}: the value after := is not valid JSON") from None
        else:
            out_value = value
        if key in out:
            raise Usage(f"{key}: given twice")
        out[key] = out_value
    return out


def _secret_fields(method: str, params: dict[str, Any], keypad: bool) -> list[tuple[str, str, bool]]:
    fields = _SECRETS.get(method, [])
    if method == "card.read" and params.get("auth") != "pin":
        return []
    if keypad:
        if method not in _KEYPAD_METHODS:
            raise Usage(f"{method} cannot use the reader's keypad")
        return []
    return fields


def ask_secrets(fields: list[tuple[str, str, bool]], use_stdin: bool,
                stdin: IO[str] | None = None) -> dict[str, str]:
    """The secret params: from stdin lines, or asked for without echo."""
    src = stdin or sys.stdin
    out: dict[str, str] = {}
    for name, prompt, optional in fields:
        value = src.readline().rstrip("\r\n") if use_stdin else getpass.getpass(prompt)
        if not value:
            if optional:
                continue
            raise Usage(f"expected {len(fields)} line(s) on stdin ({', '.join(f[0] for f in fields)})"
                        if use_stdin else f"{name}: nothing entered")
        out[name] = value
    return out


class Client:
    """A blocking JSON-RPC client on the daemon's socket."""

    def __init__(self, path: str, timeout: float | None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)  # OSError: unreachable
        self.file = self.sock.makefile("rb")
        self.next_id = 0

    def close(self) -> None:
        self.file.close()
        self.sock.close()

    def send(self, method: str, params: dict[str, Any]) -> int:
        self.next_id += 1
        self.sock.sendall(dumps({"jsonrpc": "2.0", "id": self.next_id, "method": method,
                                 "params": params}) + b"\n")
        return self.next_id

    def read(self) -> dict[str, Any]:
        """The next message (an answer or a notification). Broken at EOF or on garbage."""
        try:
            line = self.file.readline(MAX_ANSWER)
        except TimeoutError:
            raise Broken("no answer in time") from None
        except OSError as exc:
            raise Broken(f"connection broken ({exc.strerror})") from None
        if not line.endswith(b"\n"):
            raise Broken("the connection closed" if not line else "the answer is incomplete or too long")
        try:
            doc = loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise Broken("the answer is not JSON") from None
        if not isinstance(doc, dict) or doc.get("jsonrpc") != "2.0":
            raise Broken("the answer is not JSON-RPC 2.0")
        return doc

    def call(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """The answer to one call (notifications received meanwhile are skipped)."""
        try:
            rid = self.send(method, params)
        except OSError:  # the daemon may have answered and closed first (peer not allowed): read it
            rid = self.next_id
        while True:
            doc = self.read()
            if "id" in doc and (doc["id"] == rid or doc["id"] is None):
                if "error" in doc or "result" in doc:
                    return doc
                raise Broken("the answer has neither result nor error")


def _print(obj: Any, compact: bool) -> None:
    print(json.dumps(obj, ensure_ascii=False, indent=None if compact else 2))
    sys.stdout.flush()


def _report_error(err: Any, compact: bool) -> int:
    _print({"error": err}, compact)
    if isinstance(err, dict):
        data = err.get("data")
        if isinstance(data, dict) and "code" in data:
            print(f"sscardctl: {data.get('code')} ({data.get('compat_code')}): {data.get('message')} / "
                  f"{data.get('message_zh')}", file=sys.stderr)
        else:
            print(f"sscardctl: {err.get('code')}: {err.get('message')}", file=sys.stderr)
    return EXIT_ERROR


def _fail(code: int, text: str) -> NoReturn:
    print(f"sscardctl: {text}", file=sys.stderr)
    raise SystemExit(code)


def run(args: argparse.Namespace) -> int:
    if args.methods:
        for m in KIOSK_METHODS:
            print(m)
        for m in OPERATOR_METHODS:
            print(f"{m}  (operator)")
        return EXIT_OK
    if args.events and args.method:
        raise Usage("--events takes no method")
    if not args.events and not args.method:
        raise Usage("name a method (sscardctl --methods lists them), or --events")
    params = parse_params(args.params) if not args.events else {}
    leaked = sorted(SECRET_PARAMS & set(params))
    if leaked:
        raise Usage(f"{', '.join(leaked)}: never on the command line (others can read it); "
                    "sscardctl asks for it, or use --pin-stdin")
    if not args.events:
        params.update(ask_secrets(_secret_fields(args.method, params, args.keypad), args.pin_stdin))
    path = args.socket or os.environ.get("SSCARDD_SOCKET") or DEFAULT_SOCKET
    try:
        client = Client(path, args.timeout)
    except OSError as exc:
        _fail(EXIT_UNREACHABLE, f"cannot reach the daemon at {path}: {exc.strerror or exc}")
    try:
        if not args.events:
            doc = client.call(args.method, params)
            if "error" in doc:
                return _report_error(doc["error"], args.compact)
            _print(doc["result"], args.compact)
            return EXIT_OK
        doc = client.call("events.subscribe", {})
        if "error" in doc:
            return _report_error(doc["error"], args.compact)
        client.sock.settimeout(None)
        seen = 0
        while args.count is None or seen < args.count:
            msg = client.read()
            if msg.get("method") == "event":
                _print(msg.get("params"), True)
                seen += 1
        return EXIT_OK
    finally:
        client.close()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except Usage as exc:
        print(f"sscardctl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Broken as exc:
        print(f"sscardctl: {exc}", file=sys.stderr)
        return EXIT_BROKEN
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
