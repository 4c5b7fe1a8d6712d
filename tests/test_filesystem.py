"""The file-tree declarations of :mod:`apdu_specs.filesystem` (card-spec §2); vectors: test_vectors.py."""

from __future__ import annotations

import pytest

from apdu_specs import access, filesystem
from apdu_specs.access import FREE, PIN, SM, Key
from apdu_specs.filesystem import Structure


def test_ssse_aid() -> None:
    assert "sx1.sh.社会保障".encode("gbk") == filesystem.SSSE_AID
    assert len(filesystem.SSSE_AID) == 15


@pytest.mark.parametrize("generation", [2, 3])
def test_ssse_tree(generation: int) -> None:
    root = filesystem.ssse(generation)
    assert root.aid == filesystem.SSSE_AID
    assert root.algorithm_in_fci
    assert [d.name for d in root.dfs] == ["DF01", "DF02", "DF03", "DF04"]
    assert [d.aid.hex().upper() for d in root.dfs] == [f"D156000005{i:02d}" for i in range(4)]
    assert [f"{e.fid:04X}" for e in root.efs] == ["EF05", "EF06", "EF07", "EF08", "EF1E"]
    ef06 = root.ef(0xEF06)
    assert ef06.read == (FREE if generation == 2 else Key("RKSSSE"))  # §3.3
    assert ef06.write == Key("UKSSSE")
    assert root.ef(0xEF05).read == FREE
    assert root.ef(0xEF07).size == 0x300 and root.ef(0xEF08).size == 0x1000
    with pytest.raises(KeyError):
        root.ef(0xEF09)
    with pytest.raises(KeyError):
        root.df("DF05")
    assert root.df("DF04") is filesystem.DF04


def test_sfi_and_dir() -> None:
    assert filesystem.SSSE_EF05.sfi == 5
    assert filesystem.SSSE_DIR.sfi == 0x1E  # what the FCI's tag 88 announces
    assert filesystem.parse_fci(filesystem.fci_ddf(filesystem.SSSE_AID, 3)).sfi_dir == filesystem.SSSE_DIR.sfi


def test_df04() -> None:
    df = filesystem.DF04
    assert df.aid == bytes.fromhex("D15600000503")
    ef05, ef06, ef08, ef15 = (df.ef(f) for f in (0xEF05, 0xEF06, 0xEF08, 0xEF15))
    assert ef05.read == PIN | Key("RK1DF04")
    assert ef06.read == PIN & Key("RK1DF04")
    assert (ef08.structure, ef08.records, ef08.record_size) == (Structure.CYCLIC, 30, 0x1C)
    assert ef08.read == PIN and ef08.write == SM("UK2DF04")  # the project's networked-mode rule
    assert (ef15.structure, ef15.records, ef15.record_size) == (Structure.CYCLIC, 8, 3)
    assert filesystem.TxnRecord.sizeof() == 0x1C
    assert ef08.max_record() == 0x1C


def test_item_lookup_and_errors() -> None:
    ef05 = filesystem.SSSE_EF05
    assert ef05.item(0x07).name == "card_no"
    with pytest.raises(KeyError):
        ef05.item(0x08)
    card_no = ef05.item(0x07)
    with pytest.raises(ValueError, match="record tag 02, expected 07"):
        card_no.decode_record(bytes.fromhex("020133"))
    with pytest.raises(ValueError):
        filesystem.SSSE_EF05.decode_fixed(b"")
    with pytest.raises(ValueError):
        filesystem.SSSE_EF05.encode_fixed({})


def test_item_declarations_are_consistent() -> None:
    seen: dict[str, set[int]] = {}
    for address, ef, it in filesystem.all_data_items():
        assert it.kind in ("cn", "an", "b"), (address, it.name)
        assert it.encoding in ("ascii", "gbk")
        assert it.encoding == "ascii" or it.kind == "an"
        assert 0 < it.tag < 0xFF and 0 < it.length <= 0xFF
        assert ef.structure is Structure.LINEAR_VARIABLE
        tags = seen.setdefault(address, set())
        assert it.tag not in tags, f"{address}: tag {it.tag:02X} twice"
        tags.add(it.tag)
        assert ef.max_record() >= 2 + it.length


def test_every_key_named_by_an_access_condition_is_declared() -> None:
    names = set(filesystem.all_key_names())
    for generation in (2, 3):
        root = filesystem.ssse(generation)
        for df, ef in root.walk():
            for cond in (ef.read, ef.write):
                assert cond.keys() <= names, f"{df.name}/{ef.name}: {cond}"
                assert cond.keys() <= set(df.keys) | set(root.keys), f"{df.name}/{ef.name}: {cond}"


def test_every_key_has_a_card_key_id() -> None:
    for df in (filesystem.ssse(3), filesystem.DF01, filesystem.DF02, filesystem.DF03, filesystem.DF04):
        ids = [access.card_key_id(n) for n in df.keys]
        assert len(ids) == len(set(ids)), df.name


def test_file_address_dfs() -> None:
    assert set(filesystem.FILE_ADDRESS_DFS) == {"SSSE", "DF01", "DF02", "DF03", "DF04"}
    assert filesystem.FILE_ADDRESS_DFS["DF04"] is filesystem.DF04
