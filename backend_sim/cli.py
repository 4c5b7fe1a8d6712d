"""``sscard-backend``: run the settlement backend simulator, or drive its fault controls.

    sscard-backend run --seed FILE [--db FILE] [--reset] [--broker HOST:PORT]
                       [--username U] [--password-file F | --password P] [--tls-ca F]
                       [--tls-cert F --tls-key F] [--keys FILE] [--instance NAME] [--control] [-v]
    sscard-backend fault --db FILE arm KIND [--infno N] [--terminal T] [--count N] [--seconds S]
    sscard-backend fault --db FILE release [--infno N] [--msgid M] [--terminal T] [--kind K]
    sscard-backend fault --db FILE held | list | clear

Exit status: 0 done, 1 failure at run time, 2 bad usage or configuration (the message says which).
The broker password may also come from the environment (SSCARD_BACKEND_PASSWORD); ``--password``
is visible to other users in ``ps`` and meant for labs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import sqlite3
import sys
from pathlib import Path

import structlog

from apdu_specs import keyfile
from backend_sim import logs, seed
from backend_sim.faults import KINDS, Faults
from backend_sim.ledger import Ledger, LedgerError
from backend_sim.service import Backend, BrokerSettings, control_command, sd_notify

DEFAULT_DB = "sscard-backend.sqlite"


def _broker(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sscard-backend", description="settlement backend simulator")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="serve the backend contract over MQTT")
    r.add_argument("--seed", required=True, help="seed file (TOML), see config/backend-seed.example.toml")
    r.add_argument("--db", default=os.environ.get("SSCARD_BACKEND_DB", DEFAULT_DB),
                   help=f"the ledger (SQLite; shared by every instance; default {DEFAULT_DB})")
    r.add_argument("--reset", action="store_true", help="wipe the ledger and load the seed again")
    r.add_argument("--broker", type=_broker, default=("127.0.0.1", 1883), metavar="HOST:PORT")
    r.add_argument("--username")
    r.add_argument("--password", help="broker password (visible in ps: prefer --password-file)")
    r.add_argument("--password-file", type=Path, help="file whose first line is the broker password")
    r.add_argument("--tls-ca", help="CA file: connect with TLS and verify the broker against it")
    r.add_argument("--tls-cert", help="client certificate (PEM), with --tls-key")
    r.add_argument("--tls-key", help="client key (PEM)")
    r.add_argument("--client-id", help="MQTT client id (default sscard-backend-INSTANCE)")
    r.add_argument("--keys", default=str(keyfile.DEFAULT_TEST_KEYFILE),
                   help="root-key file for card cryptograms (default: the published test keys)")
    r.add_argument("--instance", default=f"{socket.gethostname()}-{os.getpid()}",
                   help="this instance's name in logs and answers")
    r.add_argument("--control", action="store_true",
                   help="also take fault controls on sscard/v1/settle/ctl (tests only)")
    r.add_argument("-v", "--verbose", action="count", default=0)
    f = sub.add_parser("fault", help="arm or release fault controls in a ledger (tests)")
    f.add_argument("--db", default=os.environ.get("SSCARD_BACKEND_DB", DEFAULT_DB))
    fsub = f.add_subparsers(dest="op", required=True)
    arm = fsub.add_parser("arm")
    arm.add_argument("kind", choices=KINDS)
    arm.add_argument("--infno")
    arm.add_argument("--terminal", dest="terminal_id")
    arm.add_argument("--count", type=int, default=1)
    arm.add_argument("--seconds", type=float, default=0.0)
    rel = fsub.add_parser("release")
    rel.add_argument("--infno")
    rel.add_argument("--msgid")
    rel.add_argument("--terminal", dest="terminal_id")
    rel.add_argument("--kind", choices=KINDS)
    for name in ("held", "list", "clear"):
        fsub.add_parser(name)
    return p


def _fail(msg: str, code: int = 2) -> int:
    print(f"sscard-backend: {msg}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.cmd == "fault":
        return _fault(args)
    return _run(args)


def _fault(args: argparse.Namespace) -> int:
    try:
        faults = Faults(args.db)
    except (OSError, FileNotFoundError) as exc:
        return _fail(str(exc))
    doc = {k: v for k, v in vars(args).items() if k not in ("db", "cmd") and v is not None}
    try:
        result = control_command(faults, doc)
    except (ValueError, sqlite3.Error) as exc:
        return _fail(f"{args.db}: {exc}" if isinstance(exc, sqlite3.Error) else str(exc))
    finally:
        faults.close()
    print(json.dumps(result, ensure_ascii=False))
    return 0


def _run(args: argparse.Namespace) -> int:
    logs.configure("DEBUG" if args.verbose > 1 else "INFO")
    log = structlog.get_logger("backend_sim")
    password = args.password
    if args.password_file is not None:
        try:
            password = args.password_file.read_text(encoding="utf-8").splitlines()[0]
        except (OSError, IndexError, UnicodeDecodeError):
            return _fail(f"--password-file {args.password_file}: cannot read a password from it")
    password = password or os.environ.get("SSCARD_BACKEND_PASSWORD") or None
    if (args.tls_cert is None) != (args.tls_key is None):
        return _fail("--tls-cert and --tls-key go together")
    try:
        keys = keyfile.load(args.keys)
        sd = seed.load(args.seed)
        ledger = Ledger(args.db, sd, keys, reset=args.reset, instance=args.instance)
    except (keyfile.KeyFileError, seed.SeedError, LedgerError) as exc:
        return _fail(str(exc))
    host, port = args.broker
    broker = BrokerSettings(host=host, port=port, username=args.username, password=password,
                            tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key,
                            client_id=args.client_id)
    try:
        broker.tls_context()
    except (OSError, ValueError) as exc:
        return _fail(f"TLS: {exc}")
    log.info("starting", instance=args.instance, db=str(args.db), keys_purpose=keys.purpose,
             seed=str(args.seed))
    backend = Backend(ledger, broker, instance=args.instance, control=args.control,
                      on_ready=lambda: sd_notify("READY=1"))
    try:
        asyncio.run(_serve(backend))
    finally:
        ledger.close()
    log.info("stopped", instance=args.instance)
    return 0


async def _serve(backend: Backend) -> None:
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(backend.run())
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await task


if __name__ == "__main__":
    sys.exit(main())
