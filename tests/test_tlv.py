"""Record TLV and BER-TLV of :mod:`apdu_specs.tlv`, and the FCIs of :mod:`apdu_specs.filesystem`."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from apdu_specs import filesystem, tlv
from apdu_specs.filesystem import SSSE_AID
from apdu_specs.tlv import Ber, TlvError

# card-spec §2.2, identical in three real traces
SSSE_FCI = bytes.fromhex("6F1C840F7378312E73682EC9E7BBE1B1A3D5CFA50988011E9F0C03860103")

# --- record TLV (card-spec §2.3) -----------------------------------------------------------------


def test_encode_decode_record() -> None:
    rec = tlv.encode_record(0x07, b"Q20000015")
    assert rec == bytes.fromhex("0709513230303030303135")
    assert tlv.decode_record(rec) == (0x07, b"Q20000015")
    assert tlv.encode_record(0x4E, b"") == b"\x4e\x00"
    assert tlv.decode_record(b"\x4e\x00") == (0x4E, b"")


def test_record_tlv_construct() -> None:
    parsed = tlv.RecordTlv.parse(bytes.fromhex("0304332E3030"))
    assert (parsed.tag, parsed.length, parsed.value) == (3, 4, b"3.00")
    assert tlv.RecordTlv.build({"tag": 3, "length": 4, "value": b"3.00"}) == bytes.fromhex("0304332E3030")


@pytest.mark.parametrize("tag", [0x00, 0xFF, 0x100, -1])
def test_encode_record_bad_tag(tag: int) -> None:
    with pytest.raises(TlvError):
        tlv.encode_record(tag, b"x")


def test_encode_record_too_long() -> None:
    assert len(tlv.encode_record(1, bytes(255))) == 257
    with pytest.raises(TlvError):
        tlv.encode_record(1, bytes(256))


@pytest.mark.parametrize(
    "hex_",
    [
        "",  # no header
        "01",  # no length
        "0002AB",  # tag 00
        "FF01AB",  # tag FF (erased)
        "0703AB",  # value shorter than the length byte
        "0701ABCD",  # longer
    ],
)
def test_decode_record_malformed(hex_: str) -> None:
    with pytest.raises(TlvError):
        tlv.decode_record(bytes.fromhex(hex_))


def test_split_records() -> None:
    blob = bytes.fromhex("020133" "0304332E3030" "4E00")
    assert tlv.split_records(blob) == [(2, b"3"), (3, b"3.00"), (0x4E, b"")]
    assert tlv.split_records(b"") == []


@pytest.mark.parametrize("hex_", ["01", "020133" "03", "0105AB", "020133" "0304332E30"])
def test_split_records_truncated(hex_: str) -> None:
    with pytest.raises(TlvError):
        tlv.split_records(bytes.fromhex(hex_))


# --- BER-TLV ---------------------------------------------------------------------------------


def test_ber_encode_primitive_and_constructed() -> None:
    assert Ber(0x88, b"\x1e").encode() == bytes.fromhex("88011E")
    assert Ber(0x9F0C, b"\x86\x01\x03").encode() == bytes.fromhex("9F0C03860103")
    node = Ber(0xA5, children=[Ber(0x88, b"\x1e")])
    assert node.encode() == bytes.fromhex("A50388011E")


@pytest.mark.parametrize(
    ("tag", "constructed"),
    [(0x6F, True), (0xA5, True), (0x61, True), (0x84, False), (0x88, False), (0x9F0C, False),
     (0xBF0C, True), (0x4F, False)],
)
def test_ber_constructed_bit(tag: int, constructed: bool) -> None:
    assert Ber(tag).constructed is constructed


@pytest.mark.parametrize(
    ("n", "header"),
    [(0, "8400"), (0x7F, "847F"), (0x80, "848180"), (0xFF, "8481FF"), (0x100, "84820100"),
     (0xFFFF, "8482FFFF")],
)
def test_ber_lengths(n: int, header: str) -> None:
    enc = Ber(0x84, bytes(n)).encode()
    assert enc[: len(header) // 2] == bytes.fromhex(header)
    [node] = tlv.ber_decode(enc)
    assert node.tag == 0x84
    assert node.value == bytes(n)


def test_ber_length_too_large() -> None:
    with pytest.raises(TlvError):
        Ber(0x84, bytes(0x10000)).encode()


def test_ber_find() -> None:
    [root] = tlv.ber_decode(SSSE_FCI)
    assert root.find(0x6F) is root
    sfi = root.find(0x88)
    assert sfi is not None and sfi.value == b"\x1e"
    name = root.find(0x84)
    assert name is not None and name.value == SSSE_AID
    assert root.find(0x86) is None  # inside 9F0C, a primitive: not searched
    assert root.find(0x50) is None


def test_ber_decode_long_form_non_minimal_is_accepted() -> None:
    [node] = tlv.ber_decode(bytes.fromhex("84810201 02".replace(" ", "")))
    assert node.value == b"\x01\x02"
    [node] = tlv.ber_decode(bytes.fromhex("8482000101"))
    assert node.value == b"\x01"


@pytest.mark.parametrize(
    "hex_",
    [
        "9F",  # two-byte tag cut after its first byte
        "84",  # no length
        "9F0C",  # no length after a two-byte tag
        "8405ABCD",  # value truncated
        "8480",  # indefinite length
        "84830000 01".replace(" ", ""),  # three length bytes
        "8481",  # long form without its length byte
        "848201",  # long form cut
        "6F038405AB",  # constructed: child truncated
        "6F0384",  # constructed: child without length
        "6F1C840F7378312E73682EC9E7BBE1B1A3D5CFA50988011E9F0C038601",  # the FCI cut short
    ],
)
def test_ber_decode_malformed(hex_: str) -> None:
    with pytest.raises(TlvError):
        tlv.ber_decode(bytes.fromhex(hex_))


def test_ber_decode_deep_nesting_is_a_tlv_error() -> None:
    # Thousands of nested constructed tags used to hit Python's recursion limit (RecursionError).
    data = b""
    for _ in range(3000):
        data = Ber(0x20).encode()[:1] + tlv._ber_len(len(data)) + data
    with pytest.raises(TlvError):
        tlv.ber_decode(data)


def test_ber_decode_moderate_nesting_is_fine() -> None:
    node = Ber(0x04, b"leaf")
    for _ in range(10):
        node = Ber(0x20, children=[node])
    enc = node.encode()
    [back] = tlv.ber_decode(enc)
    assert back.encode() == enc
    found = back.find(0x04)
    assert found is not None and found.value == b"leaf"


# --- FCI (card-spec §2.2, §6) ----------------------------------------------------------------


def test_fci_ddf_is_the_traced_ssse_fci() -> None:
    assert filesystem.fci_ddf(SSSE_AID, 3) == SSSE_FCI


def test_parse_fci_ssse() -> None:
    fci = filesystem.parse_fci(SSSE_FCI)
    assert fci.name == SSSE_AID
    assert fci.sfi_dir == 0x1E
    assert fci.algorithm == 3


@pytest.mark.parametrize("alg", [1, 2, 3])
def test_fci_ddf_algorithms(alg: int) -> None:
    fci = filesystem.parse_fci(filesystem.fci_ddf(SSSE_AID, alg))
    assert (fci.name, fci.sfi_dir, fci.algorithm) == (SSSE_AID, 0x1E, alg)


def test_fci_ddf_without_algorithm() -> None:
    raw = filesystem.fci_ddf(SSSE_AID, None)
    assert raw == bytes.fromhex("6F16840F7378312E73682EC9E7BBE1B1A3D5CFA50388011E")
    fci = filesystem.parse_fci(raw)
    assert (fci.sfi_dir, fci.algorithm) == (0x1E, None)


def test_fci_adf_and_mf() -> None:
    df04 = filesystem.fci_adf(bytes.fromhex("D15600000503"))
    assert df04 == bytes.fromhex("6F088406D15600000503")  # card-spec §6.2
    fci = filesystem.parse_fci(df04)
    assert (fci.name, fci.sfi_dir, fci.algorithm) == (bytes.fromhex("D15600000503"), None, None)
    assert filesystem.fci_mf() == bytes.fromhex("6F0483023F00")
    assert filesystem.parse_fci(filesystem.fci_mf()).name == b""


@pytest.mark.parametrize(
    "hex_",
    [
        "",  # nothing
        "840100",  # not a 6F template
        "6F00" "6F00",  # two templates
        "6F05" "9F0C02" "8605",  # 9F0C holds a malformed TLV
        "6F1C840F7378312E73682EC9E7BBE1B1A3D5CFA50988011E9F0C038601",  # truncated
    ],
)
def test_parse_fci_malformed(hex_: str) -> None:
    with pytest.raises(TlvError):
        filesystem.parse_fci(bytes.fromhex(hex_))


def test_dir_records() -> None:
    recs = filesystem.dir_records()
    assert [r.hex().upper() for r in recs[:1]] == ["610E4F06D156000005005004" + b"DF01".hex().upper()]
    for rec, df in zip(recs, (filesystem.DF01, filesystem.DF02, filesystem.DF03, filesystem.DF04),
                       strict=True):
        [tmpl] = tlv.ber_decode(rec)
        assert tmpl.tag == 0x61
        aid, label = tmpl.find(0x4F), tmpl.find(0x50)
        assert aid is not None and aid.value == df.aid
        assert label is not None and label.value == df.name.encode()
        assert len(rec) <= filesystem.SSSE_DIR.record_size


# --- properties ------------------------------------------------------------------------------

record_tags = st.integers(min_value=1, max_value=0xFE)


@given(record_tags, st.binary(max_size=255))
def test_record_round_trip(tag: int, value: bytes) -> None:
    assert tlv.decode_record(tlv.encode_record(tag, value)) == (tag, value)


@given(st.lists(st.tuples(record_tags, st.binary(max_size=40)), max_size=10))
def test_split_records_round_trip(pairs: list[tuple[int, bytes]]) -> None:
    blob = b"".join(tlv.encode_record(t, v) for t, v in pairs)
    assert tlv.split_records(blob) == pairs


def _first_bytes(constructed: bool, two_byte: bool) -> list[int]:
    return [t for t in range(0x100)
            if (t & 0x1F == 0x1F) is two_byte and bool(t & 0x20) is constructed]


def _tag(constructed: bool) -> st.SearchStrategy[int]:
    one = st.sampled_from(_first_bytes(constructed, False))
    two = st.builds(lambda a, b: (a << 8) | b, st.sampled_from(_first_bytes(constructed, True)),
                    st.integers(0, 0x7F))
    return st.one_of(one, two)


leaves = st.builds(Ber, _tag(False), st.binary(max_size=300))
trees = st.recursive(
    leaves,
    lambda kids: st.builds(lambda t, c: Ber(t, children=c), _tag(True), st.lists(kids, max_size=4)),
    max_leaves=12,
)


def _shape(node: Ber) -> tuple[object, ...]:
    if node.constructed:
        return (node.tag, tuple(_shape(c) for c in node.children))
    return (node.tag, node.value)


@given(st.lists(trees, max_size=3))
def test_ber_round_trip(nodes: list[Ber]) -> None:
    enc = b"".join(n.encode() for n in nodes)
    back = tlv.ber_decode(enc)
    assert [_shape(n) for n in back] == [_shape(n) for n in nodes]
    assert b"".join(n.encode() for n in back) == enc


@given(st.binary(max_size=300))
def test_garbage_raises_only_tlv_error(data: bytes) -> None:
    for fn in (tlv.ber_decode, filesystem.parse_fci, tlv.split_records, tlv.decode_record):
        with contextlib.suppress(TlvError):
            fn(data)


@given(st.binary(max_size=64))
def test_garbage_inside_a_valid_fci_frame(payload: bytes) -> None:
    # a well-formed outer 6F with arbitrary content exercises the nested paths of parse_fci
    data = Ber(0x6F, children=[Ber(0xA5, children=[Ber(0x9F0C, payload)])]).encode()
    with contextlib.suppress(TlvError):
        filesystem.parse_fci(data)
    data = b"\x6f" + tlv._ber_len(len(payload)) + payload
    with contextlib.suppress(TlvError):
        filesystem.parse_fci(data)
