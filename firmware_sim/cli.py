"""``sscard-emu``: issue emulated cards and PSAMs, and serve them into pcscd through vpcd or as a
serial keypad reader on a pty.

    sscard-emu issue --out card.json [--generation 2|3 --name 张三 --ssn ... --pin 123456 ...]
    sscard-emu issue --psam --out psam.json [--terminal-no 370212000001] [--service-hall]
    sscard-emu serve --card card.json [--vpcd 127.0.0.1:35963]
                     [--psam psam.json --psam-vpcd 127.0.0.1:35964] [--t0]
    sscard-emu serve --card card.json --serial [--serial-link PATH] [--keypad 246810,cancel,timeout]
                     [--initial-pin 123456 ...]
    sscard-emu show card.json

While ``serve`` runs, SIGUSR1 removes the card and SIGUSR2 re-inserts it (the PSAM stays);
SIGTERM/SIGINT stop it. Exit codes: 0 ok, 2 bad arguments or image.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from apdu_specs import keyfile
from apdu_specs.crypto import Algorithm
from apdu_specs.filesystem import SSSE_EF05, SSSE_EF06_ITEMS
from apdu_specs.psam import SERVICE_HALL_KEYS, TERMINAL_KEYS
from firmware_sim.cos import ResponseMode
from firmware_sim.image import CardImage, PsamImage
from firmware_sim.keypad import TIMEOUT, KeypadConfig, ScriptedKeypad
from firmware_sim.loader import load_card, load_psam
from firmware_sim.personalise import (
    CardParams,
    Holder,
    PersonalisationError,
    issue_card,
    issue_psam,
)
from firmware_sim.serial_reader import SerialReaderFirmware, open_pty
from firmware_sim.serve import Slot, log_trace
from firmware_sim.store import ImageError, TearSafeStore
from firmware_sim.vpcd import Card

log = logging.getLogger("sscard-emu")


class UsageError(Exception):
    pass


def _hostport(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host or "127.0.0.1", int(port)


def _serial(value: str) -> bytes:
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raise argparse.ArgumentTypeError("serial must be 8 hex digits") from None
    if len(raw) != 4:
        raise argparse.ArgumentTypeError("serial must be 8 hex digits")
    return raw


def _keypad_entries(value: str) -> list[str | None]:
    """``--keypad``: comma-separated digits, ``cancel`` or ``timeout`` (errors never echo an entry)."""
    out: list[str | None] = []
    for n, raw in enumerate(value.split(","), 1):
        entry = raw.strip()
        if entry.lower() == "cancel":
            out.append(None)
        elif entry.lower() == "timeout":
            out.append(TIMEOUT)
        elif entry.isascii() and entry.isdigit():
            out.append(entry)
        else:
            raise argparse.ArgumentTypeError(f"keypad entry {n} is not digits, 'cancel' or 'timeout'")
    return out


def _pin_digits(value: str) -> str:
    if not (value.isascii() and value.isdigit() and 4 <= len(value) <= 16):
        raise argparse.ArgumentTypeError("an initial PIN is 4 to 16 digits")
    return value


def default_keyfile() -> Path:
    env = os.environ.get("SSCARD_KEYS")
    return Path(env) if env else keyfile.DEFAULT_TEST_KEYFILE


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sscard-emu", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-v", "--verbose", action="count", default=0,
                    help="-v info, -vv APDU trace (PIN bodies redacted)")
    sub = ap.add_subparsers(dest="cmd", required=True)

    iss = sub.add_parser("issue", help="personalise a card or PSAM image")
    iss.add_argument("--out", required=True, type=Path)
    iss.add_argument("--keys", type=Path, default=None,
                     help="root key file (default: $SSCARD_KEYS or config/test-root-keys.toml)")
    iss.add_argument("--force", action="store_true", help="overwrite an existing image")
    iss.add_argument("--psam", action="store_true", help="issue a PSAM instead of a card")
    iss.add_argument("--terminal-no", default="370212000001")
    iss.add_argument("--service-hall", action="store_true",
                     help="PSAM with PUK/maintenance keys (PIN unblock and reload)")
    d = CardParams()
    h = Holder()
    iss.add_argument("--generation", type=int, choices=(2, 3), default=d.generation)
    iss.add_argument("--name", default=h.name)
    iss.add_argument("--ssn", default="", help="18 characters; default synthetic, valid check")
    iss.add_argument("--sex", default=h.sex, choices=("1", "2", "9"))
    iss.add_argument("--birth-date", default=h.birth_date)
    iss.add_argument("--region", default=d.region)
    iss.add_argument("--insured-region", default="")
    iss.add_argument("--card-no", default="", help="9 characters; default synthetic, valid check")
    iss.add_argument("--serial", type=_serial, default=d.serial, help="card serial, 8 hex")
    iss.add_argument("--pin", default=d.pin)
    iss.add_argument("--tries", type=int, default=d.pin_tries, help="PIN try limit")
    iss.add_argument("--key-tries", type=int, default=d.key_tries)
    iss.add_argument("--issue-date", default=d.issue_date)
    iss.add_argument("--expiry-date", default=d.expiry_date)

    srv = sub.add_parser("serve", help="plug a card (and PSAM) into pcscd through vpcd, "
                                       "or be a serial keypad reader on a pty")
    srv.add_argument("--card", type=Path, required=True)
    srv.add_argument("--vpcd", type=_hostport, default=("127.0.0.1", 35963))
    srv.add_argument("--psam", type=Path)
    srv.add_argument("--psam-vpcd", type=_hostport, default=("127.0.0.1", 35964))
    srv.add_argument("--t0", action="store_true",
                     help="T=0-style responses: 61xx and GET RESPONSE for case-4 commands")
    srv.add_argument("--removed", action="store_true", help="start with the card removed")
    srv.add_argument("--serial", action="store_true",
                     help="be a serial keypad reader on a new pty instead of a vpcd card")
    srv.add_argument("--serial-link", type=Path,
                     help="with --serial: also make this symlink to the pty's slave")
    srv.add_argument("--keypad", type=_keypad_entries, default=[],
                     help="with --serial: scripted keypad entries (test PINs only), comma-separated: "
                          "digits, 'cancel', 'timeout'; when they run out the keypad times out")
    srv.add_argument("--initial-pin", type=_pin_digits, action="append",
                     help="with --serial: an initial PIN the reader enforces (−35/−36); repeatable; "
                          "default 123456")

    show = sub.add_parser("show", help="print an image's public content")
    show.add_argument("image", type=Path)
    return ap


def _load_roots(path: Path | None) -> keyfile.RootKeys:
    return keyfile.load(path or default_keyfile())


def cmd_issue(args: argparse.Namespace) -> int:
    if args.out.exists() and not args.force:
        raise UsageError(f"{args.out} exists (use --force to overwrite)")
    roots = _load_roots(args.keys)
    doc: dict[str, Any]
    if args.psam:
        keys = SERVICE_HALL_KEYS if args.service_hall else TERMINAL_KEYS
        psam = issue_psam(roots, args.terminal_no, keys)
        doc = psam.to_json()
        summary = f"PSAM terminal {psam.terminal_no}, keys {','.join(keys)}"
    else:
        params = CardParams(
            holder=Holder(name=args.name, ssn=args.ssn, sex=args.sex, birth_date=args.birth_date),
            region=args.region, insured_region=args.insured_region, card_no=args.card_no,
            serial=args.serial, pin=args.pin, pin_tries=args.tries, key_tries=args.key_tries,
            generation=args.generation, issue_date=args.issue_date, expiry_date=args.expiry_date,
        )
        card = issue_card(params, roots)
        doc = card.to_json()
        summary = (f"generation-{card.generation} card {card.meta['card_no']} "
                   f"({Algorithm(card.algorithm).label}), ATR {card.atr.hex().upper()}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    TearSafeStore(args.out).save(doc)
    print(f"issued {summary} -> {args.out}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    if args.serial and args.psam:
        raise UsageError("--psam needs vpcd; the serial reader has one card slot")
    if not args.serial and (args.serial_link or args.keypad or args.initial_pin):
        raise UsageError("--serial-link, --keypad and --initial-pin need --serial")
    mode = ResponseMode.T0 if args.t0 else ResponseMode.DIRECT
    card = load_card(args.card, mode)
    card.trace = log_trace("card")  # type: ignore[assignment]
    if args.serial:
        return _serve_serial(args, card)
    host, port = args.vpcd
    slots = [Slot(card, host, port, label="card")]
    if args.removed:
        slots[0].remove()
    if args.psam:
        psam = load_psam(args.psam, mode)
        psam.trace = log_trace("psam")  # type: ignore[assignment]
        phost, pport = args.psam_vpcd
        slots.append(Slot(psam, phost, pport, label="psam"))
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        if signum == signal.SIGUSR1:
            log.info("SIGUSR1: removing the card")
            slots[0].remove()
        elif signum == signal.SIGUSR2:
            log.info("SIGUSR2: inserting the card")
            slots[0].insert()
        else:
            stop.set()

    for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    for s in slots:
        s.start()
    print(f"serving {args.card} on vpcd {args.vpcd[0]}:{args.vpcd[1]}"
          + (f", PSAM {args.psam} on {args.psam_vpcd[0]}:{args.psam_vpcd[1]}" if args.psam else "")
          + f" ({mode.value} responses); SIGUSR1 removes, SIGUSR2 inserts", flush=True)
    while not stop.is_set():
        stop.wait(0.5)
    for s in slots:
        s.stop()
    return 0


def _link_pty(link: Path, target: str) -> None:
    """Point ``link`` at the pty (replacing an older symlink, never a real file)."""
    if link.exists() and not link.is_symlink():
        raise UsageError(f"{link} exists and is not a symlink")
    tmp = link.with_name(f".{link.name}.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    tmp.replace(link)


def _serve_serial(args: argparse.Namespace, card: Card) -> int:
    keypad = ScriptedKeypad()
    keypad.load(args.keypad)
    config = KeypadConfig(initial_pins=tuple(args.initial_pin)) if args.initial_pin else KeypadConfig()
    master, slave, path = open_pty()
    # The slave stays open here too, so the master sees no hang-up between daemon connections.
    reader = SerialReaderFirmware(master, card, keypad, config, inserted=not args.removed,
                                  extra_fds=(slave,))
    link: Path | None = args.serial_link
    try:
        if link is not None:
            _link_pty(link, path)
    except (UsageError, OSError) as exc:
        reader.close()
        if isinstance(exc, UsageError):
            raise
        raise UsageError(f"cannot create {link}: {exc.strerror}") from None
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        if signum == signal.SIGUSR1:
            log.info("SIGUSR1: removing the card")
            reader.remove()
        elif signum == signal.SIGUSR2:
            log.info("SIGUSR2: inserting the card")
            reader.insert()
        else:
            stop.set()

    for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    reader.start()
    print(f"serving {args.card} as a serial keypad reader on {path}"
          + (f" (link {link})" if link is not None else "")
          + f"; open it as serial:{link or path}; SIGUSR1 removes, SIGUSR2 inserts", flush=True)
    try:
        while not stop.is_set():
            stop.wait(0.5)
    finally:
        reader.close()
        if link is not None and link.is_symlink() and os.readlink(link) == path:
            link.unlink()
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    doc = TearSafeStore(args.image).load()
    if doc.get("format") == "sscard-emu-psam/1":
        psam = PsamImage.from_json(doc)
        out: dict[str, Any] = {"kind": "psam", "terminal_no": psam.terminal_no,
                               "serial": psam.serial, "keys": sorted(psam.keys["des3"])}
    else:
        card = CardImage.from_json(doc)
        fields: dict[str, Any] = {}
        for path, items in (("SSSE/EF05", SSSE_EF05.items), ("SSSE/EF06", SSSE_EF06_ITEMS)):
            recs = card.files[path].records or []
            for it, rec in zip(items, recs, strict=False):
                v = it.decode_record(rec)
                fields[it.name] = v.hex().upper() if isinstance(v, bytes) else v
        out = {"kind": "card", "generation": card.generation, "atr": card.atr.hex().upper(),
               "pin_tries": card.pin.tries, "card_blocked": card.card_blocked,
               "blocked_apps": sorted(card.blocked_apps), "fields": fields}
    print(json.dumps(out, ensure_ascii=False, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        handler = {"issue": cmd_issue, "serve": cmd_serve, "show": cmd_show}[args.cmd]
        return handler(args)
    except (UsageError, PersonalisationError, ImageError, keyfile.KeyFileError) as exc:
        print(f"sscard-emu: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
