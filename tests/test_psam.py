"""The emulated PSAM: environments, files, DELIVERY SESSION KEY and CIPHER DATA."""

from __future__ import annotations

import pytest

from apdu_specs import crypto
from apdu_specs.crypto import Algorithm
from apdu_specs.psam import PSAM_KEY_IDS, TERMINAL_KEYS, usage_byte
from firmware_sim.cos import ResponseMode
from firmware_sim.psam import Psam
from tests.emu import new_psam, ok, roots, tx

SX1 = "7378312E73682EC9E7BBE1B1A3D5CF"
SX2 = "7378322E73682EC9E7BBE1B1A3D5CF"
APP = "00A4040006D15600000590"
FACTORS = [bytes.fromhex("1122334455667788"), bytes.fromhex("3337303230307378"),
           bytes.fromhex("3337303030307368")]  # card, city, province (card level first)


def _enter(psam: Psam, env: str) -> Algorithm:
    ok(psam, "00A404000F" + (SX2 if env == "sm4" else SX1))
    ok(psam, APP)
    return Algorithm.SM4 if env == "sm4" else Algorithm.DES3


def _session(psam: Psam, alg: Algorithm, key: str, rnd: bytes) -> bytes:
    data = b"".join(FACTORS) + rnd
    ok(psam, bytes((0xBF, 0xDE, usage_byte(3), PSAM_KEY_IDS[key], len(data))) + data)
    card_key = crypto.derive(alg, roots().get(alg, key), list(reversed(FACTORS)))
    return crypto.session_key(alg, card_key, rnd)


def test_files_and_selection() -> None:
    psam = new_psam()
    assert ok(psam, "00B0960006") == bytes.fromhex("370212000001")  # 0016 by SFI
    ok(psam, "00A40000020015")
    info = ok(psam, "00B000000F")
    assert len(info) == 15 and info[1:11] == bytes.fromhex(psam.image.serial)
    assert tx(psam, "00B0000010").sw == 0x6C0F
    assert tx(psam, "00B0001001").sw == 0x6B00
    assert ok(psam, "00B0000500") == info[5:]
    fci = ok(psam, "00A404000F" + SX2)
    assert fci.startswith(b"\x6f")
    assert psam.env == "sm4"
    assert tx(psam, "00A40000023F00").sw == 0x9000 and psam.env == "des3"
    assert tx(psam, "00A4000C02DDF1").sw == 0x9000 and psam.env == "sm4"
    ok(psam, APP)
    assert ok(psam, "00B0990004") == bytes(4)  # 0019 counter inside the application
    assert tx(psam, "00B0960006").sw == 0x6A82  # 0016 is not in the application
    assert tx(psam, "00A4000C02DF01").sw == 0x9000


@pytest.mark.parametrize(
    ("apdu", "sw"),
    [
        ("00A4040006D15600000599", 0x6A82),
        ("00A4040003D15600", 0x6700),
        ("00A4000C02ABCD", 0x6A82),
        ("00A4080C023F00", 0x6A86),
        ("00A4000702 3F00".replace(" ", ""), 0x6A86),
        ("00B0000004", 0x6986),
        ("00B0810004", 0x6A82),
        ("0084000003", 0x6700),
        ("0084010008", 0x6A86),
        ("BFEC000001", 0x6700),
        ("BFEC00000237", 0x6700),
        ("BFEC01000137", 0x6A86),
        ("80FA000008" + "00" * 8, 0x6985),  # no session key
        ("0020000003123456", 0x6D00),
    ],
)
def test_errors(apdu: str, sw: int) -> None:
    assert tx(new_psam(), apdu).sw == sw


def test_get_challenge_and_init_environment() -> None:
    psam = new_psam()
    assert len(ok(psam, "0084000008")) == 8
    assert len(ok(psam, "0084000004")) == 4
    assert tx(psam, "BFEC00000137").sw == 0x9000


@pytest.mark.parametrize("env", ["des3", "sm4"])
def test_delivery_session_key_and_cipher_data(env: str) -> None:
    psam = new_psam()
    alg = _enter(psam, env)
    bs = alg.block_size
    rnd = bytes(range(bs))
    sk = _session(psam, alg, "IRK", rnd)
    block = bytes(range(16, 16 + 2 * bs))
    assert ok(psam, b"\x80\xfa\x02\x00" + bytes((len(block),)) + block) == crypto.ecb_encrypt(alg, sk, block)
    single = ok(psam, b"\x80\xfa\x00\x00" + bytes((bs,)) + block[:bs])
    assert single == crypto.ecb_encrypt(alg, sk, block[:bs])
    assert tx(psam, b"\x80\xfa\x00\x00" + bytes((bs,)) + block[:bs]).sw == 0x6985  # single op ends it
    # MAC, single
    sk = _session(psam, alg, "UK2DF04", rnd)
    msg = b"\x04\xdc\x00\x43\x20" + bytes(28)
    assert ok(psam, b"\x80\xfa\x05\x00" + bytes((len(msg),)) + msg) == crypto.mac(alg, sk, msg)
    # MAC in parts with an explicit IV
    sk = _session(psam, alg, "UK2DF04", rnd)
    iv = bytes([0xA5] * bs)
    part1, part2, last = bytes(range(bs)), bytes(range(bs, 2 * bs)), b"\x01\x02\x03"
    assert tx(psam, b"\x80\xfa\x07\x00" + bytes((bs + bs,)) + iv + part1).sw == 0x9000
    assert tx(psam, b"\x80\xfa\x03\x00" + bytes((bs,)) + part2).sw == 0x9000
    got = ok(psam, b"\x80\xfa\x01\x00" + bytes((len(last),)) + last)
    assert got == crypto.mac(alg, sk, part1 + part2 + last, iv)
    assert tx(psam, b"\x80\xfa\x01\x00\x01\x00").sw == 0x6985


@pytest.mark.parametrize("env", ["des3", "sm4"])
def test_delivery_session_key_errors(env: str) -> None:
    psam = new_psam()
    bs = 16 if env == "sm4" else 8
    good = b"".join(FACTORS) + bytes(bs)
    hdr = bytes((0xBF, 0xDE, usage_byte(3), PSAM_KEY_IDS["IRK"], len(good)))
    ok(psam, "00A404000F" + (SX2 if env == "sm4" else SX1))
    assert tx(psam, hdr + good).sw == 0x6985  # outside the application
    ok(psam, APP)
    assert tx(psam, hdr[:2] + bytes((usage_byte(2),)) + hdr[3:] + good).sw == 0x6700  # 2 levels stated
    assert tx(psam, hdr[:2] + bytes((usage_byte(3, 2),)) + hdr[3:] + good).sw == 0x6A86  # purchase type
    assert tx(psam, hdr[:3] + b"\x7e" + hdr[4:] + good).sw == 0x6A88  # no such key
    ok(psam, hdr + good)
    assert tx(psam, "80FA000003010203").sw == 0x6700  # not block aligned
    assert tx(psam, "80FA090008" + "00" * 8).sw == 0x6A86
    assert tx(psam, "80FA070004" + "00" * 4).sw == 0x6700  # IV shorter than a block
    assert tx(psam, "80FA030008" + "00" * 8).sw == 0x6985  # no chain started


def test_terminal_psam_lacks_puk() -> None:
    psam = new_psam(TERMINAL_KEYS)
    _enter(psam, "sm4")
    data = b"".join(FACTORS) + bytes(16)
    assert tx(psam, bytes((0xBF, 0xDE, usage_byte(3), PSAM_KEY_IDS["PUK"], len(data))) + data).sw == 0x6A88
    assert tx(psam, bytes((0xBF, 0xDE, usage_byte(3), PSAM_KEY_IDS["IRK"], len(data))) + data).sw == 0x9000


def test_t0_mode() -> None:
    psam = new_psam(mode=ResponseMode.T0)
    assert tx(psam, "00A404000F" + SX2).sw >> 8 == 0x61
    ok(psam, "00A4040C06D15600000590")
    data = b"".join(FACTORS) + bytes(16)
    ok(psam, bytes((0xBF, 0xDE, usage_byte(3), PSAM_KEY_IDS["IRK"], len(data))) + data)
    assert tx(psam, "80FA000010" + "00" * 16).sw == 0x6110
    assert len(ok(psam, "00C0000010")) == 16
