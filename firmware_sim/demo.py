"""``make demo``: an emulated card and PSAM answering through a real pcscd, with a transcript.

    python -m firmware_sim.demo

Issues a generation-3 (SM4) card and a terminal PSAM into a temporary directory with
``sscard-emu issue``, uses the running pcscd (or starts one, root only), serves the card in vpcd
slot 0 ("Virtual PCD 00 00") and the PSAM in slot 1 ("Virtual PCD 00 01") with ``sscard-emu
serve``, and then talks to both through PC/SC (one connection per card):

- the ATRs; the PSAM: SELECT of its SM4 environment, its terminal number, its application;
- the card: SELECT of the social security application (FCI, algorithm 03 = SM4); the card
  identification code (its region gives the diversification factors) and card number;
- internal authentication of the card, checked through the PSAM: the card encrypts a random
  under its IRK (diversified for this card); the PSAM, holding only the IRK root key, derives
  the same card key from the diversification factors and must compute the same answer;
- external authentication with RKSSSE, computed by the PSAM the same way, which a
  generation-3 card requires before the holder's name (GBK) in SSSE/EF06 can be read;
- a wrong PIN (``63 C2``: two tries left).

Everything it started (the emulator, and pcscd if it started it) is stopped at the end. Exit
status: 0 on success, 1 if a step fails, 2 if pcscd (or pyscard) is not available.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from types import FrameType

from apdu_specs import crypto, filesystem, identifiers
from apdu_specs.crypto import Algorithm
from apdu_specs.psam import ENV_NAMES, PSAM_AID, PSAM_KEY_IDS, usage_byte
from firmware_sim.lab import (
    VPCD_PORT,
    VPCD_READERS,
    CardConnection,
    Pcscd,
    PcscdUnavailable,
    PcscError,
    scard,
    sscard_emu_argv,
    start_process,
    stop_process,
    tail_file,
    wait_card_state,
)

CARD_READER, PSAM_READER = VPCD_READERS
SW_OK = 0x9000
PRESENT_TIMEOUT = 15.0


class DemoError(Exception):
    """A step did not give the expected answer (the message says which and what came back)."""


def spaced(data: bytes) -> str:
    return data.hex(" ").upper() if data else "(none)"


class Session:
    """One PC/SC connection to one card, printing each exchange."""

    def __init__(self, label: str, conn: CardConnection) -> None:
        self.label = label
        self.conn = conn

    def send(self, what: str, apdu: bytes, expect_sw: int = SW_OK) -> bytes:
        """Send ``apdu``, print it and the answer; returns the data (``DemoError`` on another SW)."""
        print(f"  {self.label} {what}")
        print(f"      > {spaced(apdu)}")
        rapdu = self.conn.transmit(apdu)
        if len(rapdu) < 2:
            raise DemoError(f"{what}: answer without status word: {spaced(rapdu)}")
        data, sw = rapdu[:-2], int.from_bytes(rapdu[-2:], "big")
        print(f"      < {spaced(data) + '  ' if data else ''}SW {sw:04X}")
        if sw != expect_sw:
            raise DemoError(f"{what}: expected SW {expect_sw:04X}, got {sw:04X}")
        return data


def note(text: str) -> None:
    print(f"        {text}")


def record_value(what: str, rec: bytes, tag: int, length: int) -> bytes:
    if len(rec) != 2 + length or rec[0] != tag or rec[1] != length:
        raise DemoError(f"{what}: expected a record {tag:02X} {length:02X} + {length} bytes, "
                        f"got {spaced(rec)}")
    return rec[2:]


def card_part(card: Session) -> tuple[str, bytes]:
    """The card's application data; returns its region code and ATR historical bytes."""
    atr = card.conn.atr
    print(f"  card ATR  {spaced(atr)}")
    hist = identifiers.historical_bytes(atr)
    print()
    fci_raw = card.send("SELECT SSSE (sx1.sh.社会保障)",
                        bytes.fromhex("00A404000F") + filesystem.SSSE_AID)
    fci = filesystem.parse_fci(fci_raw)
    alg = fci.algorithm
    label = Algorithm(alg).label if alg in (1, 2, 3) else "?"
    note(f"FCI: name {fci.name.decode('gbk', 'replace')}, algorithm {alg:02X} ({label})"
         if alg is not None else "FCI without algorithm")
    if alg != Algorithm.SM4:
        raise DemoError(f"SELECT SSSE: a generation-3 card announces algorithm 03, got {alg}")
    card.send("SELECT EF05 (issuer data)", bytes.fromhex("00A4020002EF05"))
    card_id = record_value("card identification code",
                           card.send("READ RECORD 01 card identification code",
                                     bytes.fromhex("00B2010012")), 0x01, 16)
    region = card_id[:3].hex()
    note(f"card identification code {card_id.hex().upper()} (issuing region {region})")
    card_no = record_value("card number", card.send("READ RECORD 07 card number",
                                                    bytes.fromhex("00B207000B")), 0x07, 9)
    note(f"card number {card_no.decode('ascii', 'replace')}")
    return region, hist


def holder_name(card: Session) -> None:
    card.send("SELECT EF06 (holder data)", bytes.fromhex("00A4020002EF06"))
    name = record_value("name", card.send("READ RECORD 09 name", bytes.fromhex("00B2090020")),
                        0x09, 30)
    gbk = name.rstrip(b"\x00")
    note(f"name {gbk.decode('gbk', 'replace')} (GBK {spaced(gbk)}, 00-padded to 30 bytes)")


def psam_part(psam: Session) -> None:
    print(f"  PSAM ATR  {spaced(psam.conn.atr)}")
    print()
    sm4_env = ENV_NAMES["sm4"]
    psam.send("SELECT SM4 environment (sx2.sh.社会保障)",
              bytes.fromhex("00A40400") + bytes((len(sm4_env),)) + sm4_env)
    terminal = psam.send("READ BINARY 0016 terminal number", bytes.fromhex("00B0960006"))
    note(f"terminal number {terminal.hex()}")


def psam_cryptogram(psam: Session, key: str, factors: list[bytes], session_input: bytes,
                    plain: bytes) -> bytes:
    """The authentication cryptogram of card-spec §4.2, computed by the PSAM for a card key.

    DELIVERY SESSION KEY diversifies the PSAM's root key ``key`` down to this card's key (factors
    from the card level up) and derives the session key from ``session_input``; CIPHER DATA
    encrypts ``plain ‖ 00×8``; the left and right halves XORed give the 8-byte cryptogram.
    """
    body = b"".join(factors) + session_input.ljust(Algorithm.SM4.block_size, b"\x00")
    usage = usage_byte(len(factors))
    key_id = PSAM_KEY_IDS[key]
    psam.send(f"DELIVERY SESSION KEY: {key} root key (id {key_id:02X}), usage {usage:02X} "
              f"({len(factors)} levels, type 8), factors ‖ session input",
              bytes((0xBF, 0xDE, usage, key_id, len(body))) + body)
    block = plain + bytes(8)
    enc = psam.send("CIPHER DATA: encrypt plain ‖ 00×8",
                    bytes.fromhex("80FA0000") + bytes((len(block),)) + block)
    if len(enc) != 16:
        raise DemoError(f"CIPHER DATA: expected 16 bytes, got {len(enc)}")
    folded = bytes(a ^ b for a, b in zip(enc[:8], enc[8:], strict=True))
    note(f"folded (left half XOR right half): {spaced(folded)}")
    return folded


def internal_authentication(card: Session, psam: Session, factors: list[bytes]) -> None:
    r1 = card.send("GET CHALLENGE (R1)", bytes.fromhex("0084000008"))
    r2 = card.send("GET CHALLENGE (R2)", bytes.fromhex("0084000008"))
    if len(r1) != 8 or len(r2) != 8:
        raise DemoError("GET CHALLENGE: expected 8 bytes")
    answer = card.send("INTERNAL AUTHENTICATE with IRK (session input R2, plain R1)",
                       bytes.fromhex("0088000010") + r2 + r1)
    if len(answer) != 8:
        raise DemoError(f"INTERNAL AUTHENTICATE: expected 8 bytes, got {len(answer)}")
    expected = psam_cryptogram(psam, "IRK", factors, r2, r1)
    note(f"card's answer:                     {spaced(answer)}")
    if expected != answer:
        raise DemoError("internal authentication failed: the card's answer does not match the PSAM's")
    print("  => card is genuine")


def external_authentication(card: Session, psam: Session, factors: list[bytes]) -> None:
    """Open SSSE/EF06 of a generation-3 card: EXTERNAL AUTHENTICATE with RKSSSE (key id 0A)."""
    r3 = card.send("GET CHALLENGE (R3)", bytes.fromhex("0084000008"))
    r4 = card.send("GET CHALLENGE (R4, the session input: the card uses its latest challenge)",
                   bytes.fromhex("0084000008"))
    auth = psam_cryptogram(psam, "RKSSSE", factors, r4, r3)
    card.send("EXTERNAL AUTHENTICATE with RKSSSE (key id 0A): cryptogram ‖ R3",
              bytes.fromhex("0082000A10") + auth + r3)
    print("  => terminal authenticated: EF06 may be read")


def wrong_pin(card: Session) -> None:
    card.send("VERIFY with a wrong PIN (999999)", bytes.fromhex("0020000003999999"),
              expect_sw=0x63C2)
    note("63 C2: wrong PIN, 2 tries left (the counter is committed to the card image)")


def run_sequence(card_conn: CardConnection, psam_conn: CardConnection) -> None:
    card = Session("card", card_conn)
    psam = Session("PSAM", psam_conn)
    print("\n-- PSAM " + "-" * 70)
    psam_part(psam)
    psam.send("SELECT application D15600000590", bytes.fromhex("00A4040006") + PSAM_AID)
    print("\n-- card: social security application " + "-" * 40)
    region, hist = card_part(card)
    # The PSAM takes the diversification factors from the card level up: card, city, province.
    factors = list(reversed(crypto.diversification_factors(region, hist)))
    for level, f in zip(("card", "city", "province"), factors, strict=True):
        text = "" if level == "card" else f"  ({f.decode('ascii', 'replace')})"
        note(f"{level + ' factor':<16}{spaced(f)}{text}")
    print("\n-- internal authentication of the card, checked through the PSAM " + "-" * 12)
    internal_authentication(card, psam, factors)
    print("\n-- generation 3: holder data needs external authentication (RKSSSE) " + "-" * 9)
    external_authentication(card, psam, factors)
    holder_name(card)
    print("\n-- PIN " + "-" * 71)
    wrong_pin(card)


def daemon_view() -> None:
    """The same card through the daemon's card session (the ``sscardd`` CLI, a separate
    program: the emulator never imports the daemon)."""
    sscardd = Path(sys.executable).parent / "sscardd"
    if not sscardd.exists():
        note("(sscardd is not installed; skipping the daemon's view)")
        return
    print("\n-- the daemon's view: card session through pcscd (sscardd CLI) " + "-" * 15)
    for args in (["readers"], ["read"]):
        print(f"  $ sscardd {' '.join(args)}")
        done = subprocess.run([str(sscardd), *args], stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=60)
        if done.returncode != 0:
            raise DemoError(f"sscardd {' '.join(args)} failed: {done.stderr.strip()}")
        for line in done.stdout.strip().splitlines():
            print(f"      {line}")
    note("iReadCardBas: region|SSN|card no|card id|name|ATR hist|version|issued|expires|terminal|device|")


def _issue(argv: list[str]) -> None:
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=120)
    if done.returncode != 0:
        raise DemoError(f"{' '.join(argv)} failed ({done.returncode}): "
                        f"{(done.stderr or done.stdout).strip()}")
    print(done.stdout.strip())


def demo(workdir: Path) -> None:
    scard()  # fail early, before issuing anything, when pyscard is missing
    emu = sscard_emu_argv()
    card_img, psam_img = workdir / "card.json", workdir / "psam.json"
    print("-- issuing " + "-" * 67)
    _issue([*emu, "issue", "--out", str(card_img), "--generation", "3"])
    _issue([*emu, "issue", "--psam", "--out", str(psam_img)])
    daemon = Pcscd.acquire(log_path=workdir / "pcscd.log")
    serve: subprocess.Popen[bytes] | None = None
    try:
        pid = f" (pid {daemon.proc.pid})" if daemon.proc is not None else ""
        print(f"pcscd: {'started here' + pid if daemon.owned else 'already running, used as is'}")
        for reader in VPCD_READERS:
            if not wait_card_state(reader, present=False, timeout=2.0):
                raise DemoError(f"{reader} already holds a card: another emulator is connected to "
                                f"vpcd (ports {VPCD_PORT}, {VPCD_PORT + 1}); stop it first")
        serve_log = workdir / "serve.log"
        with open(serve_log, "wb") as log:
            serve = start_process([*emu, "-v", "serve", "--card", str(card_img),
                                   "--psam", str(psam_img)], log=log)
        for reader in VPCD_READERS:
            if not wait_card_state(reader, present=True, timeout=PRESENT_TIMEOUT):
                state = "exited" if serve.poll() is not None else "still running"
                raise DemoError(f"no card seen in {reader} after {PRESENT_TIMEOUT:.0f} s "
                                f"(sscard-emu serve {state}); its output:{tail_file(serve_log)}")
        print(f"serving: card in {CARD_READER!r}, PSAM in {PSAM_READER!r} "
              f"(sscard-emu serve, pid {serve.pid})")
        with CardConnection(CARD_READER) as card_conn, CardConnection(PSAM_READER) as psam_conn:
            run_sequence(card_conn, psam_conn)
        daemon_view()
    finally:
        if serve is not None:
            stop_process(serve)
            print(f"\nstopped sscard-emu serve (pid {serve.pid})")
        daemon.close()
        if daemon.owned:
            print("stopped pcscd (started here)")


def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwind, so that everything started here is stopped


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m firmware_sim.demo",
                                 description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        with tempfile.TemporaryDirectory(prefix="sscard-demo-") as tmp:
            demo(Path(tmp))
    except PcscdUnavailable as exc:
        print(f"demo: cannot run: {exc}", file=sys.stderr)
        return 2
    except (DemoError, PcscError) as exc:
        print(f"demo: FAILED: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # TlvError, IdentifierError, CryptoError: a malformed answer
        print(f"demo: FAILED: malformed answer: {exc}", file=sys.stderr)
        return 1
    print("\ndemo: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
