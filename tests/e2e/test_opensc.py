"""An independent PC/SC client (OpenSC's ``opensc-tool``) reads a served generation-2 card."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from firmware_sim.lab import VPCD_READERS, Pcscd
from tests.e2e.emulator import issue_card, served_in_pcscd, show

OPENSC_TOOL = shutil.which("opensc-tool")
READER = VPCD_READERS[0]

SELECT_SSSE = "00 A4 04 00 0F 73 78 31 2E 73 68 2E C9 E7 BB E1 B1 A3 D5 CF"
SSSE_AID = bytes.fromhex("7378312E73682EC9E7BBE1B1A3D5CF")

pytestmark = [
    pytest.mark.pcscd,
    pytest.mark.skipif(OPENSC_TOOL is None, reason="opensc-tool missing (Debian package opensc)"),
]


@dataclass
class Exchange:
    sent: bytes
    data: bytes
    sw: int


def _dump_line(line: str) -> bytes | None:
    """The bytes of one opensc hex-dump line: ``XX `` × n, optional space padding, then the
    n-character ASCII rendering (the first line of a dump is not padded, later ones are)."""
    for n in range(16, 0, -1):
        if 4 * n > len(line):
            continue
        hex_part, gap = line[: 3 * n], line[3 * n : len(line) - n]
        if re.fullmatch(r"(?:[0-9A-F]{2} )+", hex_part) and not gap.strip(" "):
            return bytes.fromhex(hex_part)
    return None


def parse_opensc_output(text: str) -> list[Exchange]:
    """``Sending: <hex>``, then ``Received (SW1=0x.., SW2=0x..)`` with ``:`` and hex-dump lines
    when data came back."""
    out: list[Exchange] = []
    sent: bytes | None = None
    for line in text.splitlines():
        if line.startswith("Sending:"):
            sent = bytes.fromhex(line.partition(":")[2])
            continue
        m = re.match(r"Received \(SW1=0x([0-9A-Fa-f]{2}), SW2=0x([0-9A-Fa-f]{2})\)", line)
        if m:
            assert sent is not None, f"answer without a command in:\n{text}"
            out.append(Exchange(sent, b"", int(m.group(1) + m.group(2), 16)))
            sent = None
            continue
        chunk = _dump_line(line) if out and sent is None else None
        if chunk is not None:
            out[-1].data += chunk
        elif line.strip():
            raise AssertionError(f"unexpected opensc-tool output line {line!r}")
    return out


def opensc_reader_index(reader: str) -> int:
    assert OPENSC_TOOL is not None
    listing = subprocess.run([OPENSC_TOOL, "-l"], capture_output=True, text=True, timeout=30)
    for line in listing.stdout.splitlines():
        m = re.match(r"^\s*(\d+)\s+.*\s" + re.escape(reader) + r"\s*$", line)
        if m:
            return int(m.group(1))
    raise AssertionError(f"opensc-tool -l does not list {reader!r}:\n{listing.stdout}")


def opensc_send(apdus: list[str]) -> list[Exchange]:
    """One opensc-tool run: every ``-s`` goes over the same card connection, in order."""
    assert OPENSC_TOOL is not None
    argv = [OPENSC_TOOL, "-r", str(opensc_reader_index(READER))]
    for apdu in apdus:
        argv += ["-s", apdu]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"opensc-tool failed ({done.returncode}):\n{done.stderr}{done.stdout}"
    exchanges = parse_opensc_output(done.stdout)
    assert [e.sent for e in exchanges] == [bytes.fromhex(a) for a in apdus], done.stdout
    return exchanges


def test_parse_opensc_output() -> None:
    sample = (
        "Sending: 00 A4 04 00 0F 73 78 31 2E 73 68 2E C9 E7 BB E1 B1 A3 D5 CF \n"
        "Received (SW1=0x90, SW2=0x00):\n"
        "6F 1C 84 0F 73 78 31 2E 73 68 2E C9 E7 BB E1 B1 o...sx1.sh......\n"
        "A3 D5 CF A5 09 88 01 1E 9F 0C 03 86 01 01       ..............\n"
        "Sending: 00 B2 07 00 0B \n"
        "Received (SW1=0x90, SW2=0x00):\n"
        "07 09 41 42 43 44 45 46 47 48 49 ..ABCDEFGHI\n"
        "Sending: 00 B0 00 00 02 \n"
        "Received (SW1=0x90, SW2=0x00):\n"
        "41 20 A \n"
        "Sending: 00 20 00 00 03 99 99 99 \n"
        "Received (SW1=0x63, SW2=0xC2)\n"
    )
    ex = parse_opensc_output(sample)
    assert [e.sw for e in ex] == [0x9000, 0x9000, 0x9000, 0x63C2]
    assert len(ex[0].data) == 30 and ex[0].data.endswith(b"\x86\x01\x01")
    assert ex[1].data == b"\x07\x09ABCDEFGHI"
    assert ex[2].data == b"A "
    assert ex[3].data == b""


def test_opensc_reads_generation2_card(pcscd: Pcscd, tmp_path: Path) -> None:
    image = tmp_path / "card.json"
    card_no = issue_card(image, "--generation", "2")
    assert show(image)["fields"]["card_no"] == card_no
    with served_in_pcscd(image, log=tmp_path / "serve.log"):
        ex = opensc_send([
            SELECT_SSSE,
            "00 A4 02 00 02 EF 05",
            "00 B2 07 00 0B",
            "00 A4 02 00 02 EF 06",
            "00 B2 09 00 20",
            # Last: a wrong PIN really decrements the counter in the image.
            "00 20 00 00 03 99 99 99",
        ])
    select, ef05, card_rec, ef06, name_rec, verify = ex

    assert select.sw == 0x9000
    fci = select.data
    assert fci[:2] == b"\x6f\x1c" and len(fci) == 0x1E, fci.hex(" ")
    assert fci[2:4] == b"\x84\x0f" and fci[4:19] == SSSE_AID
    assert fci.endswith(b"\x86\x01\x01"), "generation 2: algorithm 01 (3DES) in the FCI"

    assert (ef05.sw, ef05.data) == (0x9000, b"")
    assert card_rec.sw == 0x9000
    assert card_rec.data == b"\x07\x09" + card_no.encode("ascii")

    assert (ef06.sw, ef06.data) == (0x9000, b"")
    assert name_rec.sw == 0x9000
    assert name_rec.data == b"\x09\x1e" + "张三".encode("gbk").ljust(30, b"\x00")
    assert name_rec.data[:6] == bytes.fromhex("091ED5C5C8FD")

    assert (verify.sw, verify.data) == (0x63C2, b"")
    assert show(image)["pin_tries"] == 2
