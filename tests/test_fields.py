"""Data-item field types ``cn``, ``an`` (ASCII and GBK) of :mod:`apdu_specs.fields` (card-spec §2.3)."""

from __future__ import annotations

import construct as cs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from apdu_specs import fields
from apdu_specs.fields import An, Cn, FieldError

# --- cn ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "length", "hex_"),
    [
        ("370202", 3, "370202"),
        ("3702", 3, "3702FF"),
        ("12345", 3, "12345F"),
        ("", 2, "FFFF"),  # unpersonalised
        ("01", 1, "01"),
        ("20210601", 4, "20210601"),
        ("0", 1, "0F"),
    ],
)
def test_cn_encode_decode(value: str, length: int, hex_: str) -> None:
    raw = bytes.fromhex(hex_)
    assert fields.encode_cn(value, length) == raw
    assert fields.decode_cn(raw) == value
    assert Cn(length).build(value) == raw
    assert Cn(length).parse(raw) == value


@pytest.mark.parametrize(
    ("value", "length"),
    [
        ("1234567", 3),  # oversize: 7 digits in 3 bytes
        ("123", 1),
        ("12a4", 3),  # not digits
        ("-1", 3),
        (" 12", 3),
        ("12F", 3),  # the pad nibble is not a digit
        ("１２", 3),  # full-width digits: str.isdigit() but not BCD
        ("²", 3),  # superscript two: str.isdigit() too
    ],
)
def test_cn_encode_errors(value: str, length: int) -> None:
    with pytest.raises(FieldError):
        fields.encode_cn(value, length)
    with pytest.raises(FieldError):
        Cn(length).build(value)


@pytest.mark.parametrize("hex_", ["AB", "12F4", "F1FF", "1A", "FFFE", "E0"])
def test_cn_decode_non_bcd(hex_: str) -> None:
    with pytest.raises(FieldError):
        fields.decode_cn(bytes.fromhex(hex_))


def test_cn_adapter_wrong_size_is_a_construct_error() -> None:
    with pytest.raises(cs.ConstructError):
        Cn(3).parse(b"\x37")


# --- an ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "length", "encoding", "hex_"),
    [
        ("3", 1, "ascii", "33"),
        ("3.00", 4, "ascii", "332E3030"),
        ("2.0", 4, "ascii", "322E3000"),  # trailing 00
        ("", 3, "ascii", "000000"),
        ("Q20000015", 9, "ascii", "513230303030303135"),
        ("张三", 30, "gbk", "D5C5C8FD" + "00" * 26),
        ("张三", 4, "gbk", "D5C5C8FD"),
        ("社会保障", 8, "gbk", "C9E7BBE1B1A3D5CF"),
        ("sx1.sh.社会保障", 15, "gbk", "7378312E73682EC9E7BBE1B1A3D5CF"),
    ],
)
def test_an_encode_decode(value: str, length: int, encoding: str, hex_: str) -> None:
    raw = bytes.fromhex(hex_)
    assert fields.encode_an(value, length, encoding) == raw
    assert fields.decode_an(raw, encoding) == value
    assert An(length, encoding).build(value) == raw
    assert An(length, encoding).parse(raw) == value


@pytest.mark.parametrize(
    ("value", "length", "encoding", "reason"),
    [
        ("abc", 2, "ascii", "bytes"),  # oversize
        ("张三", 3, "gbk", "bytes"),  # 4 GBK bytes in 3
        ("张", 4, "ascii", "not representable"),  # unencodable text
        ("\U0001f600", 8, "gbk", "not representable"),
        ("é", 4, "ascii", "not representable"),
        ("a\x00b", 4, "ascii", "NUL"),
        ("张\x00", 4, "gbk", "NUL"),
    ],
)
def test_an_encode_errors(value: str, length: int, encoding: str, reason: str) -> None:
    with pytest.raises(FieldError, match=reason):
        fields.encode_an(value, length, encoding)
    with pytest.raises(FieldError):
        An(length, encoding).build(value)


@pytest.mark.parametrize(
    ("hex_", "encoding"),
    [("FF", "ascii"), ("80", "ascii"), ("D5C5C8", "gbk"), ("81", "gbk"), ("FF00", "gbk")],
)
def test_an_decode_errors(hex_: str, encoding: str) -> None:
    with pytest.raises(FieldError):
        fields.decode_an(bytes.fromhex(hex_), encoding)


def test_an_decode_strips_only_trailing_nul() -> None:
    assert fields.decode_an(b"ab\x00\x00") == "ab"
    assert fields.decode_an(b"\x00\x00") == ""
    assert fields.decode_an(b" a ") == " a "


def test_gbk_len() -> None:
    assert fields.gbk_len("张三") == 4
    assert fields.gbk_len("张三a") == 5
    assert fields.gbk_len("") == 0


# --- properties ----------------------------------------------------------------------------------

lengths = st.integers(min_value=1, max_value=32)


@given(st.data(), lengths)
def test_cn_round_trip(data: st.DataObject, length: int) -> None:
    value = data.draw(st.text(alphabet="0123456789", max_size=2 * length))
    raw = fields.encode_cn(value, length)
    assert len(raw) == length
    assert fields.decode_cn(raw) == value
    assert Cn(length).parse(Cn(length).build(value)) == value


@given(st.text(alphabet="0123456789", min_size=1, max_size=40), lengths)
def test_cn_oversize_is_refused(value: str, length: int) -> None:
    if len(value) <= 2 * length:
        assert len(fields.encode_cn(value, length)) == length
    else:
        with pytest.raises(FieldError):
            fields.encode_cn(value, length)


ascii_text = st.text(st.characters(min_codepoint=1, max_codepoint=127))
gbk_text = st.text(st.characters(codec="gbk", exclude_characters="\x00"), max_size=20)


@given(ascii_text, lengths)
def test_an_ascii_round_trip(value: str, length: int) -> None:
    if len(value) > length:
        with pytest.raises(FieldError):
            fields.encode_an(value, length)
        return
    raw = fields.encode_an(value, length)
    assert len(raw) == length
    assert fields.decode_an(raw) == value
    assert An(length).parse(An(length).build(value)) == value


@given(gbk_text, st.integers(min_value=1, max_value=48))
def test_an_gbk_round_trip(value: str, length: int) -> None:
    if fields.gbk_len(value) > length:
        with pytest.raises(FieldError):
            fields.encode_an(value, length, "gbk")
        return
    raw = fields.encode_an(value, length, "gbk")
    assert len(raw) == length
    assert fields.decode_an(raw, "gbk") == value


@given(st.binary(max_size=24))
def test_cn_decode_arbitrary_bytes(raw: bytes) -> None:
    try:
        value = fields.decode_cn(raw)
    except FieldError:
        return
    # whatever decodes is digits followed by F padding, so it re-encodes to the same bytes
    assert fields.encode_cn(value, len(raw)) == raw


@pytest.mark.parametrize("encoding", ["ascii", "gbk"])
@given(raw=st.binary(max_size=24))
def test_an_decode_arbitrary_bytes(encoding: str, raw: bytes) -> None:
    try:
        value = fields.decode_an(raw, encoding)
    except FieldError:
        return
    if "\x00" in value:  # an embedded NUL decodes but is not a writable value
        with pytest.raises(FieldError):
            fields.encode_an(value, len(raw), encoding)
    else:
        assert fields.encode_an(value, len(raw), encoding) == raw


@given(st.binary(max_size=24), st.integers(min_value=1, max_value=16),
       st.sampled_from(["cn", "an-ascii", "an-gbk"]))
def test_adapters_on_arbitrary_bytes(raw: bytes, length: int, kind: str) -> None:
    layout = Cn(length) if kind == "cn" else An(length, kind.removeprefix("an-"))
    try:
        value = layout.parse(raw)
    except (FieldError, cs.ConstructError):
        return
    assert isinstance(value, str)


def test_field_errors_never_echo_the_value() -> None:
    """A FieldError ends up in exception texts (write errors name it): the value must not."""
    for bad in ("1990010X", "19900101199001011990"):
        with pytest.raises(FieldError) as ei:
            fields.encode_cn(bad, 4)
        assert bad not in str(ei.value)
    with pytest.raises(FieldError) as ei2:
        fields.encode_an("张三丰" * 20, 30, "gbk")
    assert "张三" not in str(ei2.value)
