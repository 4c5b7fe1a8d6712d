"""Helpers for tests that talk to the emulated card and PSAM in-process."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from apdu_specs import crypto, keyfile
from apdu_specs.crypto import Algorithm
from apdu_specs.identifiers import historical_bytes
from apdu_specs.psam import PSAM_KEY_IDS, SERVICE_HALL_KEYS, usage_byte
from firmware_sim.cos import Cos, ResponseMode
from firmware_sim.image import CardImage
from firmware_sim.personalise import CardParams, issue_card, issue_psam
from firmware_sim.psam import Psam
from firmware_sim.sscard import SocialSecurityCard
from firmware_sim.store import TearSafeStore

SSSE_AID_HEX = "7378312E73682EC9E7BBE1B1A3D5CF"
SELECT_SSSE = "00A404000F" + SSSE_AID_HEX
SELECT_DF04 = "00A4040006D15600000503"


@cache
def roots() -> keyfile.RootKeys:
    return keyfile.load(keyfile.DEFAULT_TEST_KEYFILE)


@cache
def _image(generation: int, pin: str, tries: int) -> CardImage:
    return issue_card(CardParams(generation=generation, pin=pin, pin_tries=tries), roots())


def new_card(generation: int = 3, mode: ResponseMode = ResponseMode.DIRECT, pin: str = "123456",
             tries: int = 3, store: TearSafeStore | None = None) -> SocialSecurityCard:
    import copy

    return SocialSecurityCard(copy.deepcopy(_image(generation, pin, tries)), store, mode)


def new_psam(keys: tuple[str, ...] = SERVICE_HALL_KEYS, mode: ResponseMode = ResponseMode.DIRECT) -> Psam:
    return Psam(issue_psam(roots(), "370212000001", keys), None, mode)


@dataclass
class R:
    data: bytes
    sw: int

    @property
    def hex(self) -> str:
        return self.data.hex().upper()


def tx(cos: Cos, apdu: str | bytes) -> R:
    raw = bytes.fromhex(apdu.replace(" ", "")) if isinstance(apdu, str) else apdu
    out = cos.execute(raw)
    assert len(out) >= 2
    return R(out[:-2], int.from_bytes(out[-2:], "big"))


def ok(cos: Cos, apdu: str | bytes) -> bytes:
    r = tx(cos, apdu)
    assert r.sw == 0x9000, f"{apdu!r} -> {r.sw:04X}"
    return r.data


def card_key(card: SocialSecurityCard, name: str) -> bytes:
    """The card's diversified key, recomputed from the root keys (as a PSAM/HSM would)."""
    alg = card.alg
    factors = crypto.diversification_factors(card.image.region, historical_bytes(card.atr))
    return crypto.derive(alg, roots().get(alg, name), factors)


def external_auth(card: SocialSecurityCard, key_name: str, key_id: int, good: bool = True) -> R:
    plain = ok(card, "0084000008")
    ch = ok(card, "0084000008")
    auth = crypto.auth_data(card.alg, card_key(card, key_name), ch, plain)
    if not good:
        auth = bytes(b ^ 0xFF for b in auth)
    return tx(card, bytes((0x00, 0x82, 0x00, key_id, 0x10)) + auth + plain)


def sm_command(card: SocialSecurityCard, key_name: str, header: bytes, body: bytes,
               corrupt: bool = False) -> R:
    """Send ``header ‖ Lc ‖ body ‖ MAC`` (CLA with the SM bit) MACed per card-spec §4.4."""
    ch = ok(card, "0084000004")
    sk = crypto.session_key(card.alg, card_key(card, key_name), ch)
    lc = len(body) + 4
    mac = crypto.mac(card.alg, sk, header + bytes((lc,)) + body)
    if corrupt:
        mac = bytes((mac[0] ^ 1,)) + mac[1:]
    return tx(card, header + bytes((lc,)) + body + mac)


def psam_card_auth(psam: Psam, card: SocialSecurityCard, key_name: str, session_input: bytes,
                   plain: bytes) -> bytes:
    """What a terminal does to check a card cryptogram through the PSAM."""
    alg = card.alg
    env = "7378322E73682EC9E7BBE1B1A3D5CF" if alg is Algorithm.SM4 else SSSE_AID_HEX
    ok(psam, f"00A404{0:02X}{len(env) // 2:02X}{env}")
    ok(psam, "00A4040006D15600000590")
    factors = crypto.diversification_factors(card.image.region, historical_bytes(card.atr))
    bs = alg.block_size
    data = b"".join(reversed(factors)) + session_input.ljust(bs, b"\x00")
    ok(psam, bytes((0xBF, 0xDE, usage_byte(3), PSAM_KEY_IDS[key_name], len(data))) + data)
    block = plain if alg is Algorithm.DES3 else plain + bytes(8)
    out = ok(psam, bytes((0x80, 0xFA, 0x00, 0x00, len(block))) + block)
    return out if alg is Algorithm.DES3 else bytes(a ^ b for a, b in zip(out[:8], out[8:], strict=True))
