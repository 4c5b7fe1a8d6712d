"""The card's file tree, declared once (card-spec §2): DFs, EFs, data items, access conditions.

The emulator builds its runtime tree from these declarations; the daemon uses them to address
files (``DF04EF05|84|$``) and to decode records. Data items of record files are TLV records
whose tag is the record identifier; their value layouts are ``construct`` fields from
:mod:`apdu_specs.fields`. Fixed-layout records (DF04/EF08, EF15) are ``construct`` structs.

Every declaration may carry test vectors ``(hex, value)``; ``tests/test_vectors.py`` walks all
of them (decode, re-encode, padded input).
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import construct as cs

from apdu_specs import tlv
from apdu_specs.access import FREE, PIN, SM, Access, Key
from apdu_specs.fields import An, Cn

SSSE_AID = bytes.fromhex("7378312E73682EC9E7BBE1B1A3D5CF")  # "sx1.sh.社会保障" in GBK
MF_FID = 0x3F00
SSSE_FID = 0xDDF1  # no source gives one; readers select SSSE by name (card-spec §6)


class Structure(enum.Enum):
    TRANSPARENT = "transparent"
    LINEAR_VARIABLE = "linear-variable"  # TLV records, one data item each
    LINEAR_FIXED = "linear-fixed"
    CYCLIC = "cyclic"  # fixed-size records, newest is record 1


@dataclass(frozen=True)
class DataItem:
    """One data item of a record file: a TLV record whose tag is the identifier."""

    tag: int
    name: str
    kind: str  # "cn" | "an" | "b"
    length: int
    encoding: str = "ascii"
    label_zh: str = ""
    vectors: tuple[tuple[str, Any], ...] = ()

    @property
    def layout(self) -> cs.Construct:
        if self.kind == "cn":
            return Cn(self.length)
        if self.kind == "an":
            return An(self.length, self.encoding)
        return cs.Bytes(self.length)

    def encode_value(self, value: Any) -> bytes:
        raw: bytes = self.layout.build(value)
        return raw

    def decode_value(self, raw: bytes) -> Any:
        if len(raw) != self.length:
            raise ValueError(f"item {self.tag:02X} {self.name}: {len(raw)} bytes, expected {self.length}")
        return self.layout.parse(raw)

    def encode_record(self, value: Any) -> bytes:
        return tlv.encode_record(self.tag, self.encode_value(value))

    def decode_record(self, record: bytes) -> Any:
        tag, raw = tlv.decode_record(record)
        if tag != self.tag:
            raise ValueError(f"record tag {tag:02X}, expected {self.tag:02X}")
        return self.decode_value(raw)

    def blank_record(self) -> bytes:
        """An unpersonalised record: cn all ``FF``, an/b all ``00``."""
        fill = b"\xff" if self.kind == "cn" else b"\x00"
        return tlv.encode_record(self.tag, fill * self.length)


@dataclass(frozen=True)
class EfSpec:
    """An elementary file."""

    fid: int
    name: str
    structure: Structure
    read: Access
    write: Access
    items: tuple[DataItem, ...] = ()  # LINEAR_VARIABLE: the data items, in record order
    record_size: int = 0  # fixed-size structures; LINEAR_VARIABLE: the largest record
    records: int = 0  # fixed-size structures: number of records
    size: int = 0  # TRANSPARENT: bytes
    layout: cs.Construct | None = None  # fixed-size record layout
    vectors: tuple[tuple[str, Any], ...] = ()  # fixed-size record vectors
    label_zh: str = ""

    @property
    def sfi(self) -> int:
        return self.fid & 0x1F

    def item(self, tag: int) -> DataItem:
        for it in self.items:
            if it.tag == tag:
                return it
        raise KeyError(f"{self.name} has no item {tag:02X}")

    def max_record(self) -> int:
        if self.structure is Structure.LINEAR_VARIABLE:
            return max((2 + it.length for it in self.items), default=self.record_size)
        return self.record_size

    def decode_fixed(self, record: bytes) -> dict[str, Any]:
        if self.layout is None:
            raise ValueError(f"{self.name} has no fixed record layout")
        if len(record) != self.record_size:
            raise ValueError(f"{self.name}: record is {len(record)} bytes, expected {self.record_size}")
        parsed = self.layout.parse(record)
        return {k: v for k, v in parsed.items() if not k.startswith("_")}

    def encode_fixed(self, value: dict[str, Any]) -> bytes:
        if self.layout is None:
            raise ValueError(f"{self.name} has no fixed record layout")
        raw: bytes = self.layout.build(value)
        return raw


@dataclass(frozen=True)
class DfSpec:
    """A dedicated file (application)."""

    fid: int
    name: str
    aid: bytes
    efs: tuple[EfSpec, ...] = ()
    dfs: tuple[DfSpec, ...] = ()
    keys: tuple[str, ...] = ()  # key names this DF holds (root-key names)
    label_zh: str = ""
    algorithm_in_fci: bool = False

    def ef(self, fid: int) -> EfSpec:
        for e in self.efs:
            if e.fid == fid:
                return e
        raise KeyError(f"{self.name} has no EF {fid:04X}")

    def df(self, name: str) -> DfSpec:
        for d in self.dfs:
            if d.name == name:
                return d
        raise KeyError(f"{self.name} has no {name}")

    def walk(self) -> Iterator[tuple[DfSpec, EfSpec]]:
        for e in self.efs:
            yield self, e
        for d in self.dfs:
            yield from d.walk()


def _i(tag: int, name: str, kind: str, length: int, enc: str = "ascii", zh: str = "",
       vectors: tuple[tuple[str, Any], ...] = ()) -> DataItem:
    return DataItem(tag, name, kind, length, enc, zh, vectors)


# --- SSSE/EF05 issuer data (card-spec §2.4) -----------------------------------------------------
SSSE_EF05 = EfSpec(
    0xEF05, "EF05", Structure.LINEAR_VARIABLE, FREE, Key("UKSSSE"),
    items=(
        _i(0x01, "card_id", "b", 16, zh="卡识别码",
           vectors=(("0110370200D15600000512345678ABCDEF01",
                     bytes.fromhex("370200D15600000512345678ABCDEF01")),)),
        _i(0x02, "card_type", "an", 1, zh="卡的类别", vectors=(("020133", "3"),)),
        _i(0x03, "spec_version", "an", 4, zh="规范版本",
           vectors=(("0304332E3030", "3.00"), ("0304322E3000", "2.0"))),
        _i(0x04, "init_org", "cn", 12, zh="初始化机构编号",
           vectors=(("040C915600000237020037020001", "915600000237020037020001"),)),
        _i(0x05, "issue_date", "cn", 4, zh="发卡日期", vectors=(("050420210601", "20210601"),)),
        _i(0x06, "expiry_date", "cn", 4, zh="卡有效期", vectors=(("060420310601", "20310601"),)),
        _i(0x07, "card_no", "an", 9, zh="卡号", vectors=(("0709513230303030303135", "Q20000015"),)),
    ),
    label_zh="发卡机构数据",
)

# --- SSSE/EF06 holder basic data (card-spec §2.5) -----------------------------------------------
SSSE_EF06_ITEMS = (
    _i(0x08, "ssn", "an", 18, zh="社会保障号码",
       vectors=(("0812333730323032313939303031303131323337", "370202199001011237"),)),
    _i(0x09, "name", "an", 30, "gbk", zh="姓名",
       vectors=(("091ED5C5C8FD" + "00" * 26, "张三"),)),
    _i(0x4E, "name_ext", "an", 20, "gbk", zh="姓名扩展", vectors=(("4E14" + "00" * 20, ""),)),
    _i(0x0A, "sex", "an", 1, zh="性别", vectors=(("0A0131", "1"),)),
    _i(0x0B, "ethnicity", "cn", 1, zh="民族", vectors=(("0B0101", "01"), ("0B01FF", ""))),
    _i(0x0C, "birthplace", "cn", 3, zh="出生地", vectors=(("0C03370202", "370202"),)),
    _i(0x0D, "birth_date", "cn", 4, zh="出生日期", vectors=(("0D0419900101", "19900101"),)),
)


def ssse_ef06(generation: int) -> EfSpec:
    """EF06 is free to read on 2.0 cards and needs RKSSSE on 3.0 cards."""
    return EfSpec(0xEF06, "EF06", Structure.LINEAR_VARIABLE,
                  FREE if generation < 3 else Key("RKSSSE"), Key("UKSSSE"),
                  items=SSSE_EF06_ITEMS, label_zh="持卡人基本信息")


SSSE_EF07 = EfSpec(0xEF07, "EF07", Structure.TRANSPARENT, Key("RKSSSE"), Key("UKSSSE"),
                   size=0x300, label_zh="指纹")
SSSE_EF08 = EfSpec(0xEF08, "EF08", Structure.TRANSPARENT, Key("RKSSSE"), Key("UKSSSE"),
                   size=0x1000, label_zh="照片")
# DIR: linear records of templates 61 { 4F AID, 50 label }; SFI 1E as the FCI says.
SSSE_DIR = EfSpec(0xEF1E, "DIR", Structure.LINEAR_VARIABLE, FREE, Key("UKSSSE"),
                  record_size=0x20, label_zh="目录文件")

# --- DF04 medical insurance (card-spec §2.7) ----------------------------------------------------
DF04_EF05 = EfSpec(
    0xEF05, "EF05", Structure.LINEAR_VARIABLE, PIN | Key("RK1DF04"), Key("UK1DF04"),
    items=(
        _i(0x81, "insurance_type", "an", 8, zh="医疗保险类别", vectors=(("81083331300000000000", "310"),)),
        _i(0x84, "insured_region", "cn", 3, zh="参保地", vectors=(("8403370202", "370202"),)),
        _i(0x87, "health_record_no", "an", 0x11, zh="健康档案号"),
        _i(0x8C, "person_category", "cn", 1, zh="人员类别", vectors=(("8C0111", "11"),)),
        _i(0x80, "account_opened", "cn", 4, zh="开户日期", vectors=(("800420210601", "20210601"),)),
        _i(0x8B, "account_no", "an", 0x1D, zh="个人账户号"),
        _i(0x8A, "medical_cert_no", "an", 0x0F, zh="医疗证号"),
        _i(0x83, "designated_1", "an", 9, zh="定点机构1"),
        _i(0x86, "designated_2", "an", 9, zh="定点机构2"),
        _i(0x89, "designated_3", "an", 9, zh="定点机构3"),
        _i(0x7D, "injury_inst_1", "an", 9, zh="工伤定点1"),
        _i(0x7E, "injury_inst_2", "an", 9, zh="工伤定点2"),
        _i(0x7F, "injury_inst_3", "an", 9, zh="工伤定点3"),
        _i(0x8D, "maternity_inst_1", "an", 9, zh="生育定点1"),
        _i(0x8E, "maternity_inst_2", "an", 9, zh="生育定点2"),
        _i(0x8F, "usage_mode", "an", 1, zh="卡使用模式", vectors=(("8F0131", "1"),)),
    ),
    label_zh="医疗保险基本信息",
)
DF04_EF06 = EfSpec(
    0xEF06, "EF06", Structure.LINEAR_VARIABLE, PIN & Key("RK1DF04"), Key("UK2DF04"),
    items=(
        _i(0x90, "offline_allowed", "an", 1, zh="允许脱网结算", vectors=(("900130", "0"),)),
        _i(0x92, "offline_amount", "cn", 4, zh="脱网累计金额", vectors=(("920400001250", "00001250"),)),
        _i(0x93, "offline_count", "an", 2, zh="脱网累计次数", vectors=(("93023031", "01"),)),
    ),
    label_zh="医疗保险临时脱网结算信息",
)

TxnRecord = cs.Struct(
    "seq" / cs.Int16ub,
    "txn_type" / An(1),
    "terminal" / Cn(6),
    "time" / Cn(7),
    "account_fen" / cs.Int32ub,
    "self_pay_fen" / cs.Int32ub,
    "fund_fen" / cs.Int32ub,
)
assert TxnRecord.sizeof() == 0x1C

DF04_EF08 = EfSpec(
    0xEF08, "EF08", Structure.CYCLIC, PIN, SM("UK2DF04"),
    record_size=0x1C, records=30, layout=TxnRecord,
    vectors=((
        "0001" "32" "370212000001" "20261125103000" "000004E2" "00000064" "000003E8",
        {"seq": 1, "txn_type": "2", "terminal": "370212000001", "time": "20261125103000",
         "account_fen": 1250, "self_pay_fen": 100, "fund_fen": 1000},
    ),),
    label_zh="医疗交易明细",
)
SpecialRecord = cs.Struct("seq" / cs.Int16ub, "settlement_class" / An(1))
DF04_EF15 = EfSpec(
    0xEF15, "EF15", Structure.CYCLIC, PIN | Key("RK1DF04"), Key("UK2DF04"),
    record_size=3, records=8, layout=SpecialRecord,
    vectors=(("000739", {"seq": 7, "settlement_class": "9"}),),
    label_zh="特殊医疗结算记录",
)

# --- DF01..DF03 (card-spec §2.6, summarised; item lengths are this project's choice) ------------


def _rec_ef(fid: int, read: Access, write: Access, items: tuple[DataItem, ...] = (),
            record_size: int = 0x40, zh: str = "") -> EfSpec:
    return EfSpec(fid, f"EF{fid & 0xFF:02X}", Structure.LINEAR_VARIABLE, read, write,
                  items=items, record_size=record_size, label_zh=zh)


def _cyc_ef(fid: int, read: Access, write: Access, size: int, n: int, zh: str = "") -> EfSpec:
    return EfSpec(fid, f"EF{fid & 0xFF:02X}", Structure.CYCLIC, read, write,
                  record_size=size, records=n, label_zh=zh)


def _rd(df: str) -> Access:
    return PIN | Key(f"RK1{df}")


DF01 = DfSpec(
    0xDF01, "DF01", bytes.fromhex("D15600000500"),
    efs=(
        _rec_ef(0xEF05, _rd("DF01"), Key("UK1DF01"), (
            _i(0x20, "hukou_type", "an", 1, zh="户口性质"),
            _i(0x21, "hukou_address", "an", 0x50, "gbk", zh="户口所在地地址"),
            _i(0x0E, "hukou_region", "cn", 3, zh="户口所在地区划"),
        ), zh="户籍信息"),
        _rec_ef(0xEF06, _rd("DF01"), Key("UK4DF01"), (
            _i(0x23, "address", "an", 0x50, "gbk", zh="常住地址"),
            _i(0x24, "postcode", "cn", 3, zh="邮政编码"),
            _i(0x28, "phone", "an", 0x0F, zh="联系电话"),
            _i(0x2C, "mobile", "an", 0x0F, zh="手机号码"),
            _i(0x2D, "email", "an", 0x20, zh="电子邮箱"),
        ), zh="居住信息"),
        _rec_ef(0xEF07, _rd("DF01"), Key("UK2DF01"), (
            _i(0x29, "employment_status", "an", 2, zh="就业状态"),), zh="就业状态"),
        _rec_ef(0xEF08, _rd("DF01"), Key("UK3DF01"), (
            _i(0x2B, "marital_status", "an", 2, zh="婚姻状况"),), zh="婚姻状况"),
        _rec_ef(0xEF09, _rd("DF01"), Key("UK2DF01"), (
            _i(0x2E, "personnel_category", "an", 2, zh="人员类别"),
            _i(0x30, "employer_code", "an", 0x12, zh="单位编号"),
            _i(0x32, "employer_name", "an", 0x46, "gbk", zh="单位名称"),
        ), zh="人员类别与单位"),
        _rec_ef(0xEF0A, _rd("DF01"), Key("UK5DF01"), (
            _i(0x37, "nationality", "an", 3, zh="国籍", vectors=(("370343484E", "CHN"),)),
            _i(0x38, "political_status", "an", 2, zh="政治面貌"),
            _i(0x39, "party_date", "cn", 4, zh="入党（团）日期"),
        ), zh="国籍与政治面貌"),
        _rec_ef(0xEF15, _rd("DF01"), Key("UK6DF01"), (
            _i(0x2A, "education", "an", 2, zh="文化程度"),
            _i(0x40, "degree", "b", 0x30, zh="学历学位"),
        ), zh="文化程度"),
        *(EfSpec(fid, f"EF{fid & 0xFF:02X}", Structure.TRANSPARENT, FREE,
                 Key(f"UK{k}DF01"), size=0x128, label_zh="预留")
          for fid, k in zip(range(0xEF16, 0xEF1B), "789AB", strict=True)),
    ),
    keys=("STKDF01", "RK1DF01", *(f"UK{k}DF01" for k in "123456789AB")),
    label_zh="公共应用",
)
DF02 = DfSpec(
    0xDF02, "DF02", bytes.fromhex("D15600000501"),
    efs=(
        _rec_ef(0xEF05, _rd("DF02"), Key("UK1DF02"), zh="职业技能"),
        _rec_ef(0xEF06, _rd("DF02"), Key("UK2DF02"), zh="就业失业状态"),
        _cyc_ef(0xEF07, _rd("DF02"), Key("UK3DF02"), 0x55, 4, zh="就业记录"),
        _rec_ef(0xEF09, _rd("DF02"), Key("UK4DF02"), zh="失业登记证"),
        _rec_ef(0xEF15, _rd("DF02"), Key("UK5DF02"), zh="援助信息"),
        _cyc_ef(0xEF16, _rd("DF02"), Key("UK6DF02"), 0x20, 4, zh="扶持政策"),
    ),
    keys=("STKDF02", "RK1DF02", *(f"UK{k}DF02" for k in "123456")),
    label_zh="就业与失业",
)
DF03 = DfSpec(
    0xDF03, "DF03", bytes.fromhex("D15600000502"),
    efs=(
        _rec_ef(0xEF05, PIN | Key("RK2DF03"), Key("UK1DF03"), zh="失业保险"),
        _rec_ef(0xEF06, _rd("DF03"), Key("UK2DF03"), zh="劳动能力"),
        _rec_ef(0xEF07, _rd("DF03"), Key("UK3DF03"), zh="养老保险"),
        _rec_ef(0xEF15, _rd("DF03"), Key("UK4DF03"), zh="工伤保险"),
        _rec_ef(0xEF16, _rd("DF03"), Key("UK5DF03"), zh="生育保险"),
        _rec_ef(0xEF17, _rd("DF03"), Key("UK6DF03"), zh="工伤认定"),
        _rec_ef(0xEF18, _rd("DF03"), Key("UK7DF03"), zh="供养亲属"),
        _rec_ef(0xEF19, _rd("DF03"), Key("UK8DF03"), zh="参保凭证"),
    ),
    keys=("STKDF03", "LKDF03", "RK1DF03", "RK2DF03", *(f"UK{k}DF03" for k in "12345678")),
    label_zh="社会保险1",
)
DF04 = DfSpec(
    0xDF04, "DF04", bytes.fromhex("D15600000503"),
    efs=(DF04_EF05, DF04_EF06, DF04_EF08, DF04_EF15),
    keys=("STKDF04", "LKDF04", "RK1DF04", "UK1DF04", "UK2DF04"),
    label_zh="社会保险2（医疗保险）",
)

SSSE_KEYS = ("IRK", "STKSSSE", "UKSSSE", "BK", "PUK", "RKSSSE")


def ssse(generation: int) -> DfSpec:
    """The SSSE DDF of a card of ``generation`` (2 or 3)."""
    return DfSpec(
        SSSE_FID, "SSSE", SSSE_AID,
        efs=(SSSE_EF05, ssse_ef06(generation), SSSE_EF07, SSSE_EF08, SSSE_DIR),
        dfs=(DF01, DF02, DF03, DF04),
        keys=SSSE_KEYS,
        label_zh="社会保障应用",
        algorithm_in_fci=True,
    )


def all_key_names() -> list[str]:
    """Every root-key name a card of either generation uses (the key file must hold them)."""
    names = list(SSSE_KEYS)
    for d in (DF01, DF02, DF03, DF04):
        names.extend(d.keys)
    return names


def all_data_items() -> Iterator[tuple[str, EfSpec, DataItem]]:
    """Every declared data item, with its file's address (``SSSEEF05``, ``DF04EF05``, ...)."""
    root = ssse(3)
    for df, ef in root.walk():
        for it in ef.items:
            yield f"{df.name}{ef.name}", ef, it


def dir_records() -> list[bytes]:
    """The SSSE DIR records: 61 { 4F AID, 50 label } for DF01..DF04."""
    out = []
    for d in (DF01, DF02, DF03, DF04):
        tmpl = tlv.Ber(0x61, children=[tlv.Ber(0x4F, d.aid), tlv.Ber(0x50, d.name.encode())])
        out.append(tmpl.encode())
    return out


def fci_ddf(aid: bytes, algorithm: int | None) -> bytes:
    """SSSE FCI (card-spec §2.2): ``6F { 84 name, A5 { 88 01 1E, 9F0C { 86 01 alg } } }``."""
    a5 = [tlv.Ber(0x88, b"\x1e")]
    if algorithm is not None:
        # 9F0C is a primitive tag by BER rules; its value holds the TLV 86 01 <alg>.
        a5.append(tlv.Ber(0x9F0C, tlv.Ber(0x86, bytes((algorithm,))).encode()))
    return tlv.Ber(0x6F, children=[tlv.Ber(0x84, aid), tlv.Ber(0xA5, children=a5)]).encode()


def fci_adf(aid: bytes) -> bytes:
    """ADF FCI: ``6F { 84 AID }``."""
    return tlv.Ber(0x6F, children=[tlv.Ber(0x84, aid)]).encode()


def fci_mf() -> bytes:
    """MF FCI: ``6F { 83 3F00 }`` (file identifier)."""
    return tlv.Ber(0x6F, children=[tlv.Ber(0x83, MF_FID.to_bytes(2, "big"))]).encode()


@dataclass(frozen=True)
class Fci:
    """What a reader learns from an FCI."""

    name: bytes = b""
    sfi_dir: int | None = None
    algorithm: int | None = None
    extra: dict[int, bytes] = field(default_factory=dict)


def parse_fci(data: bytes) -> Fci:
    """Parse an FCI; ``tlv.TlvError`` if it is not a well-formed ``6F`` template."""
    nodes = tlv.ber_decode(data)
    if len(nodes) != 1 or nodes[0].tag != 0x6F:
        raise tlv.TlvError("FCI must be one 6F template")
    root = nodes[0]
    name = root.find(0x84)
    sfi = root.find(0x88)
    alg = None
    idd = root.find(0x9F0C)
    if idd is not None:
        alg = next((n for n in tlv.ber_decode(idd.value) if n.tag == 0x86), None)
    return Fci(
        name=name.value if name else b"",
        sfi_dir=sfi.value[0] if sfi and len(sfi.value) == 1 else None,
        algorithm=alg.value[0] if alg and len(alg.value) == 1 else None,
    )


FILE_ADDRESS_DFS = {"SSSE": None, "DF01": DF01, "DF02": DF02, "DF03": DF03, "DF04": DF04}
