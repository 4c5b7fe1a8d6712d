"""``sscardd``: the daemon and the operator commands.

    sscardd run [-c FILE]         (the daemon: sscardd.service)
    sscardd readers [--json]
    sscardd status [--socket PATH] [--json]
    sscardd read [--reader NAME] [--psam-reader NAME] [--json] [--address ADDR [--auth pin|key]]
    sscardd pin verify [--reader NAME] [--keypad | --pin-stdin]
    sscardd pin change [--reader NAME] [--keypad | --pin-stdin]
    sscardd demo [--keep] [-v]    (broker, backend, emulated card, two daemons: a transcript)
    sscardd broker-provision --terminals FILE [--out dynsec.json] [--backends N | --backend NAME ...]
    sscardd reconcile [-c FILE] [--date YYYY-MM-DD | --from YYYY-MM-DD --to YYYY-MM-DD] [--json]

NAME is a PC/SC reader name (``Virtual PCD 00 00``), ``serial:/dev/ttyUSB0`` or
``emulated:IMAGE``. Without ``--reader`` the first PC/SC reader holding a card is used; without
``--psam-reader`` every other PC/SC reader is asked for the PSAM application. PINs are never
taken from the command line (other users see it in ``ps``): the reader's keypad, a prompt, or
standard input (one PIN per line).

When the daemon runs (its kiosk socket exists: ``--socket``, ``$SSCARDD_SOCKET`` or
``/run/sscardd/kiosk.sock``) and no ``--reader``/``--psam-reader`` is named, ``read`` and ``pin``
go through the daemon's socket (it holds the reader); ``status`` always does (exit 3 when no
daemon answers). ``sscardctl`` calls any socket method.

Exit codes: 0 success, 1 a card/reader error (printed with its code and the reader-interface
code), 2 bad usage, 3 (``status``, and ``read``/``pin`` through the daemon) no daemon answers on
its socket or it refuses this user. ``reconcile``: 0 the journal and the backend agree, 3 they differ (the
differences are listed), 1 an error (its code), 2 bad usage or a bad config file (the key named).
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

import structlog

from sscardd import broker, log
from sscardd.broker import DEFAULT_ITERATIONS, ProvisionError
from sscardd.errors import KINDS, SSCardError
from sscardd.psam import PsamClient
from sscardd.readers import open_reader
from sscardd.readers.base import Reader
from sscardd.readers.discover import find_card_reader, find_psam, pcsc_reader_names
from sscardd.session import CardSession, PinPolicy

log_ = structlog.get_logger("sscardd.cli")
DEFAULT_SOCKET = "/run/sscardd/kiosk.sock"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sscardd", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-v", "--verbose", action="count", default=0, help="-v info, -vv APDU trace")
    ap.add_argument("--log-json", action="store_true", help="JSON log lines on stderr")
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="the daemon (POS API over MQTT, settlement, journal, reversal)")
    run.add_argument("-c", "--config", type=Path, default=None, metavar="FILE",
                     help="configuration file (default $SSCARDD_CONFIG or /etc/sscardd/sscardd.toml)")
    dm = sub.add_parser(
        "demo", help="the settlement path end to end: broker, backend, emulated card, two daemons",
        description="Starts mosquitto on a free loopback port, the backend simulator with the demo seed, "
        "an emulated card and PSAMs and two daemons (a pharmacy and a hospital), plays the main "
        "scenarios as a transcript, and stops all it started. Exit 0 all as expected, 1 not, 2 cannot "
        "run here.",
    )
    dm.add_argument("--keep", action="store_true",
                    help="keep the temporary directory (logs, journals, ledger, card images)")
    # SUPPRESS: a default here would overwrite a -v given before the subcommand.
    dm.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                    help="the daemons' log lines on stderr (-v info, -vv debug)")
    r = sub.add_parser("readers", help="list PC/SC readers and what they hold")
    r.add_argument("--json", action="store_true")

    def socket_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--socket", metavar="PATH", default=None,
                       help=f"the daemon's socket (default $SSCARDD_SOCKET or {DEFAULT_SOCKET})")

    st = sub.add_parser("status", help="the running daemon's status (daemon.status on its socket)")
    socket_arg(st)
    st.add_argument("--json", action="store_true")

    def reader_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--reader", help="card reader (default: the daemon's, else the first PC/SC reader "
                                        "with a card)")
        p.add_argument("--psam-reader", help="PSAM reader (default: found automatically)")
        p.add_argument("--initial-pin", action="append", default=None,
                       help="the region's initial PIN(s) (default 123456)")
        socket_arg(p)

    rd = sub.add_parser("read", help="iReadCardBas, or iReadCard with --address")
    reader_args(rd)
    rd.add_argument("--json", action="store_true")
    rd.add_argument("--address", help="file address, e.g. 'DF04EF05|84|$'")
    rd.add_argument("--auth", choices=("key", "pin"), default="key")
    rd.add_argument("--pin-stdin", action="store_true", help="read the PIN for --auth pin from stdin")
    pin = sub.add_parser("pin", help="verify or change the cardholder PIN")
    pin.add_argument("action", choices=("verify", "change"))
    reader_args(pin)
    src = pin.add_mutually_exclusive_group()
    src.add_argument("--keypad", action="store_true", help="on the reader's keypad")
    src.add_argument("--pin-stdin", action="store_true", help="PIN(s) from stdin, one per line")
    bp = sub.add_parser(
        "broker-provision",
        help="write mosquitto's dynamic-security file for the terminals and backends",
        description="Writes a complete dynamic-security JSON file: per terminal a daemon client "
        "(term-ID) and a POS client (pos-ID) with their own roles, and the backends with one shared "
        "role. Passwords come from the terminals file or are generated and printed once on stdout; "
        "a replaced file keeps the stored hashes of the clients it still lists (unless --rotate). "
        "Restart the broker to apply it (SIGHUP does not reload it).",
    )
    bp.add_argument("--terminals", required=True, type=Path, metavar="FILE",
                    help="TOML: [[terminal]] id, institution, daemon_password, pos_password, ...")
    bp.add_argument("--out", type=Path, default=Path("dynsec.json"), metavar="FILE",
                    help="the dynamic-security file to write (default dynsec.json)")
    be = bp.add_mutually_exclusive_group()
    be.add_argument("--backends", type=int, metavar="N", help="N backends, backend-1 ... backend-N")
    be.add_argument("--backend", action="append", metavar="NAME", help="a backend by name (repeatable)")
    bp.add_argument("--iterations", type=int, default=DEFAULT_ITERATIONS,
                    help=f"PBKDF2-SHA512 iterations for new hashes (default {DEFAULT_ITERATIONS})")
    bp.add_argument("--rotate", action="store_true",
                    help="new passwords for every client without one in the terminals file")
    rc = sub.add_parser(
        "reconcile",
        help="compare this terminal's journal with the settlement backend (3201 totals, 3202 details)",
        description="Sends the journal's totals of the period to the backend (3201) and, when they "
        "differ, its settlements (3202), and lists the differences. Connects with the terminal's "
        "daemon credentials under the client id TERMINAL-cli (never the daemon's). Exit 0 agree, "
        "3 differ, 1 error, 2 bad usage or config.",
    )
    rc.add_argument("-c", "--config", type=Path, default=None, metavar="FILE",
                    help="configuration file (default $SSCARDD_CONFIG or /etc/sscardd/sscardd.toml)")
    rc.add_argument("--date", metavar="YYYY-MM-DD", help="one settlement day (default today, Beijing time)")
    rc.add_argument("--from", dest="date_from", metavar="YYYY-MM-DD", help="first day (with --to)")
    rc.add_argument("--to", dest="date_to", metavar="YYYY-MM-DD", help="last day (inclusive)")
    rc.add_argument("--json", action="store_true", help="the report as JSON on stdout")
    return ap


def _read_pins(n: int, use_stdin: bool) -> list[str]:
    if use_stdin:
        lines = [sys.stdin.readline().rstrip("\r\n") for _ in range(n)]
        if any(not line for line in lines):
            raise SSCardError("INVALID_INPUT", f"expected {n} PIN line(s) on stdin")
        return lines
    prompts = ["PIN: "] if n == 1 else ["old PIN: ", "new PIN: ", "new PIN again: "]
    return [getpass.getpass(p) for p in prompts]


def _print_error(exc: SSCardError, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"ok": False, "error": exc.to_dict()}, ensure_ascii=False))
    else:
        print(f"sscardd: {exc.code} ({exc.compat_code}): {exc.message} / {exc.message_zh}",
              file=sys.stderr)


async def _with_session(args: argparse.Namespace) -> tuple[CardSession, list[Reader]]:
    card = await find_card_reader(args.reader)
    opened: list[Reader] = [card]
    psam = await find_psam(args.psam_reader, exclude=[card.name])
    if psam is not None:
        opened.append(psam.reader)
    policy = PinPolicy(frozenset(args.initial_pin or ["123456"]))
    return CardSession(card, psam, pin_policy=policy, trace=log.apdu_trace), opened


async def cmd_readers(args: argparse.Namespace) -> int:
    rows: list[dict[str, Any]] = []
    for name in pcsc_reader_names():
        reader = open_reader(name)
        try:
            row: dict[str, Any] = {"reader": name, "card": await reader.present()}
            if row["card"]:
                st = await CardSession(reader).status()
                row["atr"] = st.get("atr")
                if st.get("sscard"):
                    row["holds"] = f"social security card (generation {st['generation']})"
                else:
                    try:
                        row["holds"] = f"PSAM, terminal {await asyncio.to_thread(PsamClient(reader).probe)}"
                    except SSCardError:
                        row["holds"] = "other card"
            rows.append(row)
        except SSCardError as exc:
            rows.append({"reader": name, "error": exc.code})
        finally:
            await reader.close()
    if args.json:
        print(json.dumps(rows, ensure_ascii=False, indent=1))
    else:
        for row in rows:
            what = row.get("holds") or ("empty" if not row.get("card") else row.get("error", ""))
            print(f"{row['reader']}: {what}")
    return 0


def _daemon_socket(args: argparse.Namespace, *, required: bool = False) -> str | None:
    """The running daemon's socket, if one is there (and no reader was named)."""
    if not required and (getattr(args, "reader", None) or getattr(args, "psam_reader", None)):
        return None
    path = getattr(args, "socket", None) or os.environ.get("SSCARDD_SOCKET") or DEFAULT_SOCKET
    try:
        return path if stat.S_ISSOCK(os.stat(path).st_mode) or required else None
    except OSError:
        return path if required else None


def _daemon_call(path: str, method: str, params: dict[str, Any]) -> dict[str, Any]:
    """One call on the daemon's socket: the result, or the daemon's named error as SSCardError."""
    from sscardd.ctl import Broken, Client

    try:
        client = Client(path, 120.0)
    except OSError as exc:
        raise DaemonUnreachable(f"cannot reach the daemon at {path}: {exc.strerror or exc}") from None
    try:
        doc = client.call(method, params)
    except Broken as exc:
        raise DaemonUnreachable(str(exc)) from None
    finally:
        client.close()
    if "result" in doc and isinstance(doc["result"], dict):
        return doc["result"]
    raw = doc.get("error")
    err: dict[str, Any] = raw if isinstance(raw, dict) else {}
    data = err.get("data")
    if isinstance(data, dict) and data.get("code") in KINDS:
        details = {k: v for k, v in data.items() if k not in ("code", "compat_code", "message", "message_zh")}
        if isinstance(details.get("sw"), str):  # to_dict() gives the status word in hex
            details["sw"] = int(details["sw"], 16)
        raise SSCardError(data["code"], **details)
    raise DaemonUnreachable(f"the daemon refused: {err.get('message', 'no answer')}")


class DaemonUnreachable(Exception):
    """No daemon answered on the socket, or it refused this user (exit 3)."""


async def cmd_status(args: argparse.Namespace) -> int:
    path = _daemon_socket(args, required=True)
    assert path is not None
    status = await asyncio.to_thread(_daemon_call, path, "daemon.status", {})
    print(json.dumps(status, ensure_ascii=False, indent=1 if args.json else 2))
    return 0


async def cmd_read(args: argparse.Namespace) -> int:
    path = _daemon_socket(args)
    if path is not None:
        if args.address:
            params: dict[str, Any] = {"address": args.address, "auth": args.auth}
            if args.auth == "pin":
                params["pin"] = _read_pins(1, args.pin_stdin)[0]
            res = await asyncio.to_thread(_daemon_call, path, "card.read", params)
            out = res["value"]
            print(json.dumps({"ok": True, "result": out}, ensure_ascii=False) if args.json else out)
            return 0
        res = await asyncio.to_thread(_daemon_call, path, "card.read_basic", {})
        if args.json:
            print(json.dumps({"ok": True, "result": res}, ensure_ascii=False, indent=1))
        else:
            print(res["compat"])
        return 0
    session, opened = await _with_session(args)
    try:
        if args.address:
            pin = _read_pins(1, args.pin_stdin)[0] if args.auth == "pin" else None
            out = await session.read(args.address, pin=pin, auth=args.auth)
            print(json.dumps({"ok": True, "result": out}, ensure_ascii=False) if args.json else out)
            return 0
        info = await session.read_basic()
        log_.info("card read", card_no=info.card_no, ssn=info.ssn, name=info.name)
        if args.json:
            print(json.dumps({"ok": True, "result": info.to_json()}, ensure_ascii=False, indent=1))
        else:
            print(info.compat())
        return 0
    finally:
        for r in opened:
            await r.close()


async def cmd_pin(args: argparse.Namespace) -> int:
    path = _daemon_socket(args)
    if path is not None:
        if args.action == "verify":
            params = {} if args.keypad else {"pin": _read_pins(1, args.pin_stdin)[0]}
            await asyncio.to_thread(_daemon_call, path, "pin.verify", params)
        else:
            given = [] if args.keypad else _read_pins(3, args.pin_stdin)
            params = dict(zip(("old", "new", "new_again"), given, strict=False))
            await asyncio.to_thread(_daemon_call, path, "pin.change", params)
        print(f"PIN {'verified' if args.action == 'verify' else 'changed'}")
        return 0
    session, opened = await _with_session(args)
    try:
        if args.action == "verify":
            pin = None if args.keypad else _read_pins(1, args.pin_stdin)[0]
            await session.verify_pin(pin)
        else:
            pins = [None, None, None] if args.keypad else _read_pins(3, args.pin_stdin)
            await session.change_pin(*pins)
        print(f"PIN {'verified' if args.action == 'verify' else 'changed'}")
        return 0
    finally:
        for r in opened:
            await r.close()


async def cmd_broker_provision(args: argparse.Namespace) -> int:
    try:
        terminals, backends = broker.load_terminals_file(args.terminals)
        if args.backends is not None:
            wanted = broker.default_backends(args.backends)
        elif args.backend:
            wanted = [broker.BackendSpec(broker.check_backend_name(n)) for n in args.backend]
        else:
            wanted = [] if backends else broker.default_backends(1)
        # Backends named on the command line use the file's password for that name, if any.
        from_file = {b.name: b for b in backends}
        backends = [from_file.pop(b.name, b) for b in wanted] + list(from_file.values())
        existing = None if args.rotate else broker.read_dynsec(args.out)
        result = broker.provision(terminals, backends, iterations=args.iterations,
                                  existing=existing, rotate=args.rotate)
        broker.write_dynsec(args.out, result.config)
    except ProvisionError as exc:
        print(f"sscardd broker-provision: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"sscardd broker-provision: {args.out}: {exc.strerror}", file=sys.stderr)
        return 1
    log_.info("dynamic-security file written", path=str(args.out), clients=len(result.usernames),
              generated=len(result.generated), kept=len(result.kept))
    if result.generated:
        # The only place a generated password appears: stdout, once (the file holds only hashes).
        print("# generated passwords (username, password); shown once, the file holds only hashes")
        for username, password in result.generated.items():
            print(f"{username}\t{password}")
    print(f"wrote {args.out}: {len(terminals)} terminal(s), {len(backends)} backend(s), "
          f"{len(result.generated)} new password(s), {len(result.kept)} kept; restart mosquitto to "
          "apply it, and make it readable by the broker's user (mosquitto drops to it)",
          file=sys.stderr)
    return 0


DEFAULT_CONFIG = Path("/etc/sscardd/sscardd.toml")


def config_path(arg: Path | None) -> Path:
    env = os.environ.get("SSCARDD_CONFIG")
    return arg or (Path(env) if env else DEFAULT_CONFIG)


def cmd_run(args: argparse.Namespace) -> int:
    """``sscardd run``: exit 2 on a bad configuration (the key and the reason on stderr), 0 after
    SIGTERM/SIGINT."""
    import signal

    # A SIGHUP before the daemon's own handler is in place must not kill it (systemd counts a
    # death by SIGHUP as clean and would not restart it).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    from sscardd import config as config_mod
    from sscardd import service

    path = config_path(args.config)
    try:
        cfg = config_mod.load(path)
    except config_mod.ConfigError as exc:
        print(f"sscardd: {exc}", file=sys.stderr)
        return 2
    level = cfg.logging.level if not args.verbose else ["INFO", "DEBUG"][min(args.verbose, 2) - 1]
    log.configure(level, json=True if args.log_json else cfg.logging.json)
    try:
        return asyncio.run(service.serve(cfg))
    except KeyboardInterrupt:
        return 0
    except Exception:  # a bug: logged through the redacting chain, never printed raw
        log_.exception("daemon failed")
        return 70


def _reconcile_period(args: argparse.Namespace) -> tuple[str, str]:
    from sscardd.reconcile import check_period, today

    if args.date is not None and (args.date_from is not None or args.date_to is not None):
        raise ValueError("give either --date or --from/--to, not both")
    if (args.date_from is None) != (args.date_to is None):
        raise ValueError("--from and --to go together")
    if args.date_from is not None:
        begin, end = args.date_from, args.date_to
    else:
        begin = end = args.date if args.date is not None else today()
    check_period(begin, end)
    return begin, end


async def cmd_reconcile(args: argparse.Namespace) -> int:
    from sscardd.config import ConfigError, load
    from sscardd.reconcile import reconcile

    try:
        begin, end = _reconcile_period(args)
    except ValueError as exc:
        print(f"sscardd reconcile: {exc}", file=sys.stderr)
        return 2
    try:
        report = await reconcile(load(config_path(args.config)), begin, end)
    except ConfigError as exc:
        print(f"sscardd reconcile: {exc}", file=sys.stderr)
        return 2
    except SSCardError as exc:
        if args.json:
            err = exc.to_dict()
            if exc.detail:
                err["detail"] = exc.detail
            print(json.dumps({"ok": False, "error": err}, ensure_ascii=False))
        else:
            detail = f": {exc.detail}" if exc.detail else ""
            if exc.details.get("backend_code"):
                said = exc.details.get("backend_message")
                detail += f" (backend: {exc.details['backend_code']}{f', {said}' if said else ''})"
            print(f"sscardd reconcile: {exc.code} ({exc.compat_code}): {exc.message} / {exc.message_zh}"
                  f"{detail}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"ok": True, "result": report.to_json()}, ensure_ascii=False, indent=1))
    else:
        print(report.text())
    return 0 if report.agree else 3


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "run":
        return cmd_run(args)
    if args.cmd == "demo":
        from sscardd import demo

        return demo.main(args)
    level = ["WARNING", "INFO", "DEBUG"][min(args.verbose, 2)]
    log.configure(level, json=True if args.log_json else None)
    handler = {"readers": cmd_readers, "status": cmd_status, "read": cmd_read, "pin": cmd_pin,
               "broker-provision": cmd_broker_provision, "reconcile": cmd_reconcile}[args.cmd]
    try:
        return asyncio.run(handler(args))
    except SSCardError as exc:
        _print_error(exc, getattr(args, "json", False))
        return 1
    except DaemonUnreachable as exc:
        print(f"sscardd: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        return 130
    except Exception:  # a bug: logged through the redacting chain, never printed raw
        log_.exception("unexpected error")
        return 70


if __name__ == "__main__":
    sys.exit(main())
