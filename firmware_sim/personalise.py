"""Card and PSAM personalisation: synthetic holders with valid check characters.

Every parameter has a synthetic default (no real card-holder data): the social security number
carries its ISO 7064 MOD 11-2 check character, the card number its §2.9 check character, and the
card identification code its authentication code computed with the card's own IRK.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from apdu_specs import crypto, filesystem, identifiers
from apdu_specs.access import card_key_id
from apdu_specs.crypto import Algorithm
from apdu_specs.fields import FieldError
from apdu_specs.filesystem import DfSpec, Structure
from apdu_specs.identifiers import Atr, IdentifierError
from apdu_specs.keyfile import RootKeys
from apdu_specs.psam import PSAM_KEY_IDS, TERMINAL_KEYS
from firmware_sim.image import CardImage, FileContent, KeyEntry, PinState, PsamImage
from firmware_sim.psam import psam_atr


class PersonalisationError(ValueError):
    """A personalisation parameter is invalid; the message names it."""


@dataclass
class Holder:
    name: str = "张三"
    ssn: str = ""  # default: from region + birth date + sequence, with its check character
    sex: str = "1"
    ethnicity: str = "01"
    birth_date: str = "19900101"
    birthplace: str = ""  # default: the region


@dataclass
class CardParams:
    holder: Holder = field(default_factory=Holder)
    region: str = "370202"
    card_no: str = ""  # default: Q + 7 digits from the serial + check character
    serial: bytes = bytes.fromhex("12345678")
    pin: str = "123456"
    pin_tries: int = 3
    key_tries: int = 3
    generation: int = 3
    card_type: str = "3"
    issue_date: str = "20210601"
    expiry_date: str = "20310601"
    insured_region: str = ""  # default: the region
    insurance_type: str = "310"
    person_category: str = "11"


def default_ssn(region: str, birth: str, seq: int = 123) -> str:
    body = f"{region}{birth}{seq:03d}"
    return body + identifiers.ssn_check_char(body)


def default_card_no(serial: bytes) -> str:
    body = "Q" + f"{int.from_bytes(serial, 'big') % 10_000_000:07d}"
    return body + identifiers.card_no_check_char(body)


def _check_date(label: str, value: str) -> None:
    try:
        dt.datetime.strptime(value, "%Y%m%d")
    except ValueError:
        raise PersonalisationError(f"{label}: not a date YYYYMMDD") from None


def _check_params(p: CardParams) -> None:
    if p.generation not in (2, 3):
        raise PersonalisationError("generation must be 2 or 3")
    if len(p.region) != 6 or not (p.region.isascii() and p.region.isdigit()):
        raise PersonalisationError("region must be 6 digits")
    if len(p.serial) != 4:
        raise PersonalisationError("serial must be 4 bytes")
    if not (p.pin.isascii() and p.pin.isdigit()) or not 4 <= len(p.pin) <= 16:
        raise PersonalisationError("pin must be 4..16 digits")
    if not 1 <= p.pin_tries <= 15 or not 1 <= p.key_tries <= 15:
        raise PersonalisationError("tries must be 1..15")
    for label, v in (("issue date", p.issue_date), ("expiry date", p.expiry_date),
                     ("birth date", p.holder.birth_date)):
        _check_date(label, v)
    try:
        if p.holder.ssn:
            identifiers.validate_ssn(p.holder.ssn)
        if p.card_no:
            identifiers.validate_card_no(p.card_no)
    except IdentifierError as exc:
        raise PersonalisationError(str(exc)) from exc
    if p.holder.sex not in ("1", "2", "9"):
        raise PersonalisationError("sex must be 1, 2 or 9")


def issue_card(p: CardParams, roots: RootKeys) -> CardImage:
    """Personalise a card image: files, diversified keys, PIN."""
    _check_params(p)
    alg = Algorithm.SM4 if p.generation == 3 else Algorithm.DES3
    atr = Atr.for_card(p.region, p.serial)
    factors = crypto.diversification_factors(p.region, atr.historical)
    keys: dict[str, KeyEntry] = {}
    for name in filesystem.all_key_names():
        value = crypto.derive(alg, roots.get(alg, name), factors)
        keys[name] = KeyEntry(name, card_key_id(name), value, p.key_tries, p.key_tries)
    first12 = bytes.fromhex(p.region[:6]) + identifiers.RID + p.serial
    card_id = first12 + identifiers.card_id_auth_code(alg, keys["IRK"].value, first12)
    holder = p.holder
    ssn = holder.ssn or default_ssn(p.region, holder.birth_date)
    card_no = p.card_no or default_card_no(p.serial)
    values: dict[str, dict[int, object]] = {
        "SSSE/EF05": {
            0x01: card_id, 0x02: p.card_type,
            0x03: "3.00" if p.generation == 3 else "2.00",
            0x04: "9156000002" + p.region[:2] + "0200" + p.region[:2] + "020001",
            0x05: p.issue_date, 0x06: p.expiry_date, 0x07: card_no,
        },
        "SSSE/EF06": {
            0x08: ssn, 0x09: holder.name[:15], 0x4E: holder.name[15:], 0x0A: holder.sex,
            0x0B: holder.ethnicity, 0x0C: holder.birthplace or p.region, 0x0D: holder.birth_date,
        },
        "SSSE/DF04/EF05": {
            0x81: p.insurance_type, 0x84: p.insured_region or p.region,
            0x8C: p.person_category, 0x80: p.issue_date, 0x8F: "1",
        },
        "SSSE/DF04/EF06": {0x90: "0", 0x92: "00000000", 0x93: "00"},
        "SSSE/DF01/EF0A": {0x37: "CHN"},
    }
    files: dict[str, FileContent] = {}
    ssse = filesystem.ssse(p.generation)
    try:
        _personalise_df(ssse, "SSSE", values, files)
    except FieldError as exc:
        raise PersonalisationError(str(exc)) from exc
    files["SSSE/DIR"] = FileContent(records=filesystem.dir_records())
    pin_bcd = crypto.pin_to_bcd(p.pin)
    return CardImage(
        generation=p.generation,
        algorithm=int(alg),
        atr=atr.encode(),
        region=p.region,
        pin=PinState.new(pin_bcd, p.pin_tries),
        keys=keys,
        files=files,
        meta={"card_no": card_no, "issued_by": "sscard-emu (synthetic test card)",
              "keys_purpose": roots.purpose},
    )


def _personalise_df(df: DfSpec, path: str, values: dict[str, dict[int, object]],
                    files: dict[str, FileContent]) -> None:
    for ef in df.efs:
        ef_path = f"{path}/{ef.name}"
        if ef.structure is Structure.TRANSPARENT:
            files[ef_path] = FileContent(data=bytearray(ef.size))
        elif ef.structure is Structure.LINEAR_VARIABLE and ef.items:
            vals = values.get(ef_path, {})
            recs = []
            for it in ef.items:
                if it.tag in vals:
                    value = vals[it.tag]
                    if it.kind == "cn" and isinstance(value, str):
                        value = value[: 2 * it.length]
                    recs.append(it.encode_record(value))
                else:
                    recs.append(it.blank_record())
            files[ef_path] = FileContent(records=recs)
        else:
            files[ef_path] = FileContent(records=[])
    for sub in df.dfs:
        _personalise_df(sub, f"{path}/{sub.name}", values, files)


def issue_psam(roots: RootKeys, terminal_no: str = "370212000001",
               key_names: tuple[str, ...] = TERMINAL_KEYS, serial: str | None = None) -> PsamImage:
    if len(terminal_no) != 12 or not (terminal_no.isascii() and terminal_no.isdigit()):
        raise PersonalisationError("terminal number must be 12 digits")
    unknown = [k for k in key_names if k not in PSAM_KEY_IDS]
    if unknown:
        raise PersonalisationError(f"no PSAM key id for {unknown}")
    serial = serial or "1000" + terminal_no + "0001"
    if len(serial) != 20 or not (serial.isascii() and serial.isdigit()):
        raise PersonalisationError("PSAM serial must be 20 digits")
    keys: dict[str, dict[str, KeyEntry]] = {}
    for env, alg in (("des3", Algorithm.DES3), ("sm4", Algorithm.SM4)):
        keys[env] = {n: KeyEntry(n, PSAM_KEY_IDS[n], roots.get(alg, n), 3, 3) for n in key_names}
    return PsamImage(terminal_no=terminal_no, serial=serial, atr=psam_atr(serial), keys=keys,
                     meta={"keys": list(key_names), "keys_purpose": roots.purpose})
