"""Every test vector declared in :mod:`apdu_specs.filesystem`, and the record images of card-spec Appendix A.

One parametrised test walks all ``DataItem.vectors`` (via ``filesystem.all_data_items()``) and all
``EfSpec.vectors`` of fixed-record files: decode, re-encode byte-identical, and decode of the value
padded by the type's own rules (card-spec §2.3: ``cn`` right-padded with nibble ``F``, ``an`` with
``00``). A new declaration with vectors is tested here without touching this file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import construct as cs
import pytest

from apdu_specs import fields, filesystem, identifiers, tlv
from apdu_specs.filesystem import DataItem, EfSpec, Structure


@dataclass(frozen=True)
class Vector:
    address: str  # "SSSEEF05", "DF04EF08", ...
    ef: EfSpec
    item: DataItem | None  # None: a fixed-size record vector of ``ef``
    hex: str
    value: Any

    @property
    def raw(self) -> bytes:
        return bytes.fromhex(self.hex)


def _collect() -> list[Any]:
    params = []
    for address, ef, item in filesystem.all_data_items():
        for i, (h, v) in enumerate(item.vectors):
            case_id = f"{address}-{item.tag:02X}-{item.name}" + (f"#{i}" if len(item.vectors) > 1 else "")
            params.append(pytest.param(Vector(address, ef, item, h, v), id=case_id))
    for df, ef in filesystem.ssse(3).walk():
        for i, (h, v) in enumerate(ef.vectors):
            case_id = f"{df.name}{ef.name}-record" + (f"#{i}" if len(ef.vectors) > 1 else "")
            params.append(pytest.param(Vector(f"{df.name}{ef.name}", ef, None, h, v), id=case_id))
    return params


VECTORS = _collect()


def _pad(kind: str, value: Any, length: int, encoding: str = "ascii") -> bytes | None:
    """The value padded to ``length`` by the §2.3 rules, built without ``apdu_specs.fields``."""
    if kind == "cn":
        digits = str(value)
        return bytes.fromhex(digits + "F" * (2 * length - len(digits)))
    if kind == "an":
        text = str(value).encode(encoding)
        return text + b"\x00" * (length - len(text))
    return None  # b: no padding rule


def _check_item_vector(v: Vector) -> None:
    item = v.item
    assert item is not None
    raw = v.raw
    tag, value_bytes = tlv.decode_record(raw)
    assert tag == item.tag, "vector is filed under the wrong item"
    assert len(value_bytes) == item.length
    # decode, re-encode byte-identical (whole record and the bare value)
    assert item.decode_record(raw) == v.value
    assert item.decode_value(value_bytes) == v.value
    assert item.encode_record(v.value) == raw
    assert item.encode_value(v.value) == value_bytes
    # padded input: the value as written by the type's padding rule decodes the same, and the
    # vector is that canonical padding (e.g. "2.0" + 00, "" → cn all FF).
    padded = _pad(item.kind, v.value, item.length, item.encoding)
    if padded is not None:
        assert padded == value_bytes
        assert item.decode_value(padded) == v.value
        if item.kind == "cn" and len(v.value) < 2 * item.length:
            # a cn value shorter than the field: what is left is F nibbles only
            assert value_bytes.hex().upper()[len(v.value):] == "F" * (2 * item.length - len(v.value))
        if item.kind == "an":
            unpadded = str(v.value).encode(item.encoding)
            assert fields.decode_an(unpadded + b"\x00" * (item.length - len(unpadded)),
                                    item.encoding) == v.value
    # the record's length byte is checked
    with pytest.raises(tlv.TlvError):
        item.decode_record(raw + b"\x00")
    with pytest.raises(ValueError):
        item.decode_value(value_bytes[:-1])


def _check_fixed_vector(v: Vector) -> None:
    ef = v.ef
    assert ef.layout is not None
    assert ef.structure in (Structure.CYCLIC, Structure.LINEAR_FIXED)
    raw = v.raw
    assert len(raw) == ef.record_size
    assert ef.decode_fixed(raw) == v.value
    assert ef.encode_fixed(v.value) == raw
    # padded input: each cn/an sub-field holds its value padded by the §2.3 rule
    offset = 0
    for sub in ef.layout.subcons:
        size = sub.sizeof()
        inner = sub.subcon if isinstance(sub, cs.Renamed) else sub
        if isinstance(inner, fields.Cn):
            assert raw[offset : offset + size] == _pad("cn", v.value[sub.name], size)
        elif isinstance(inner, fields.An):
            assert raw[offset : offset + size] == _pad("an", v.value[sub.name], size, inner.encoding)
        offset += size
    assert offset == ef.record_size
    with pytest.raises(ValueError):
        ef.decode_fixed(raw + b"\xff")
    with pytest.raises(ValueError):
        ef.decode_fixed(raw[:-1])


@pytest.mark.parametrize("vector", VECTORS)
def test_vector(vector: Vector) -> None:
    if vector.item is not None:
        _check_item_vector(vector)
    else:
        _check_fixed_vector(vector)


def test_the_walk_finds_item_and_fixed_record_vectors() -> None:
    ids = {p.id for p in VECTORS}
    assert "SSSEEF05-07-card_no" in ids
    assert "SSSEEF06-09-name" in ids
    assert "DF04EF08-record" in ids
    assert "DF04EF15-record" in ids
    assert len(VECTORS) >= 25


# --- card-spec Appendix A ------------------------------------------------------------------------

APPENDIX_A_EF05 = [
    "0110370200D15600000512345678ABCDEF01",
    "020133",
    "0304332E3030",
    "040C915600000237020037020001",
    "050420210601",
    "060420310601",
    "0709513230303030303135",
]
APPENDIX_A_EF06 = [
    "0812333730323032313939303031303131323337",
    "091ED5C5C8FD0000000000000000000000000000000000000000000000000000",
    "4E140000000000000000000000000000000000000000",
    "0A0131",
    "0B0101",
    "0C03370202",
    "0D0419900101",
]
EXPECTED_EF05 = {
    "card_id": bytes.fromhex("370200D15600000512345678ABCDEF01"),
    "card_type": "3",
    "spec_version": "3.00",
    "init_org": "915600000237020037020001",
    "issue_date": "20210601",
    "expiry_date": "20310601",
    "card_no": "Q20000015",
}
EXPECTED_EF06 = {
    "ssn": "370202199001011237",
    "name": "张三",
    "name_ext": "",
    "sex": "1",
    "ethnicity": "01",
    "birthplace": "370202",
    "birth_date": "19900101",
}


@pytest.mark.parametrize(
    ("ef", "images", "total", "expected"),
    [
        pytest.param(filesystem.SSSE_EF05, APPENDIX_A_EF05, 64, EXPECTED_EF05, id="SSSEEF05"),
        pytest.param(filesystem.ssse_ef06(3), APPENDIX_A_EF06, 91, EXPECTED_EF06, id="SSSEEF06"),
    ],
)
def test_appendix_a_record_images(ef: EfSpec, images: list[str], total: int,
                                  expected: dict[str, Any]) -> None:
    records = [bytes.fromhex(h) for h in images]
    blob = b"".join(records)
    assert len(records) == 7
    assert len(blob) == total  # the Le of the read-all 00B20105xx in card-spec §2.4/§2.5
    assert sum(2 + it.length for it in ef.items) == total

    pairs = tlv.split_records(blob)
    assert [t for t, _ in pairs] == [it.tag for it in ef.items]  # declared (record-number) order
    decoded = {it.name: it.decode_value(v) for it, (_, v) in zip(ef.items, pairs, strict=True)}
    assert decoded == expected

    # record by record, and the whole image re-encoded from the values
    for it, rec in zip(ef.items, records, strict=True):
        assert it.decode_record(rec) == expected[it.name]
        assert ef.item(it.tag) is it
    assert b"".join(it.encode_record(expected[it.name]) for it in ef.items) == blob


def test_appendix_a_values_are_valid_identifiers() -> None:
    identifiers.validate_card_no(EXPECTED_EF05["card_no"])
    identifiers.validate_ssn(EXPECTED_EF06["ssn"])
    card_id = EXPECTED_EF05["card_id"]
    assert card_id[:3].hex() == "370200"
    assert card_id[3:8] == identifiers.RID
    assert card_id == identifiers.card_id_code("370200", card_id[8:12], card_id[12:16])
    # the reader's full name is name (09) + name extension (4E), padding stripped
    assert EXPECTED_EF06["name"] + EXPECTED_EF06["name_ext"] == "张三"


def test_max_record_lengths_match_the_read_all_answers() -> None:
    assert filesystem.SSSE_EF05.max_record() == 2 + 16
    assert filesystem.ssse_ef06(2).max_record() == 2 + 30


@pytest.mark.parametrize(
    "case",
    [pytest.param((ef, it), id=f"{addr}-{it.tag:02X}-{it.name}")
     for addr, ef, it in filesystem.all_data_items()],
)
def test_blank_record_decodes_as_unpersonalised(case: tuple[EfSpec, DataItem]) -> None:
    _, item = case
    blank = item.blank_record()
    assert len(blank) == 2 + item.length
    value = item.decode_record(blank)
    assert value == (bytes(item.length) if item.kind == "b" else "")
    assert item.encode_record(value) == blank
