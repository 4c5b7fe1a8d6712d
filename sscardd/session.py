"""The card session: one calm, reader-agnostic conversation with a social security card.

Every public method is one operation: the card is held exclusively, the APDUs run in the card
reader's worker thread (one hand-over to the event loop per operation, not per APDU), and the
PSAM — in another reader — is asked through :class:`~sscardd.psam.PsamClient`. Whatever the card
answers, an operation ends with a result or a named :class:`~sscardd.errors.SSCardError`: garbage
from a card is CARD_GARBAGE, a card that is not a social security card NOT_SSCARD, a card pulled
mid-command CARD_REMOVED. After an operation that verified the PIN the card is reset, so the
verification never carries over to another caller.
"""

from __future__ import annotations

import datetime as dt
import hmac
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import construct

from apdu_specs import apdu as A
from apdu_specs import crypto, filesystem, identifiers, tlv
from apdu_specs.access import FREE, PIN, AllOf, AnyOf, Key, card_key_id, sm_key
from apdu_specs.crypto import Algorithm
from apdu_specs.fields import FieldError
from apdu_specs.filesystem import DataItem, Structure
from apdu_specs.serial_frame import KeypadStatus
from sscardd import address as addr
from sscardd.errors import SSCardError, card_status
from sscardd.psam import CardRef, PsamClient
from sscardd.readers.base import CardLink, Reader
from sscardd.transport import Exchanger, TraceHook

T = TypeVar("T")

SW_OK = 0x9000
KEYPAD_TIMEOUT = 30.0
# Decoding what a card sent; host input is validated before an operation starts, so these can
# only come from the card.
_GARBAGE = (tlv.TlvError, FieldError, identifiers.IdentifierError, crypto.CryptoError,
            construct.ConstructError, UnicodeDecodeError, ValueError)
# Characters a card value may not carry: they would shift the fields of the compat strings.
_FORBIDDEN = frozenset("|$^") | frozenset(chr(c) for c in range(0x20))
# Host-side PSAM shortfalls after which another way of meeting an access condition may be tried
# (none of them cost the card a try).
_PSAM_SHORTFALL = frozenset({"NO_PSAM", "PSAM_KEY_LEVEL", "PSAM_NO_RKSSSE", "PSAM_NO_ALGORITHM"})


@dataclass(frozen=True)
class PinPolicy:
    """PIN rules the daemon enforces for PINs it handles (keypad readers enforce their own)."""

    initial_pins: frozenset[str] = frozenset({"123456"})
    min_len: int = 4
    max_len: int = 12

    def check_format(self, pin: str) -> None:
        if not isinstance(pin, str) or not (pin.isascii() and pin.isdigit()) \
                or not self.min_len <= len(pin) <= self.max_len:
            raise SSCardError("PIN_LENGTH", f"a PIN is {self.min_len}..{self.max_len} digits")


@dataclass(frozen=True)
class BasicInfo:
    """The holder's identity as ``iReadCardBas`` returns it."""

    region: str
    ssn: str = field(repr=False)
    card_no: str
    card_id: bytes
    name: str = field(repr=False)
    historical: bytes
    spec_version: str
    issue_date: str
    expiry_date: str
    terminal_no: str
    device_no: str
    generation: int
    algorithm: Algorithm

    def compat_gbk(self) -> bytes:
        """The compat string as the reader DLL hands it over: GBK bytes (field lengths count
        GBK bytes: a name of up to 50, i.e. 25 Chinese characters)."""
        return self.compat().encode("gbk")

    def compat(self) -> str:
        """The exact 11-field ``iReadCardBas`` string, each field terminated by ``|``."""
        fields = [self.region, self.ssn, self.card_no, self.card_id.hex().upper(), self.name,
                  self.historical.hex().upper(), self.spec_version, self.issue_date,
                  self.expiry_date, self.terminal_no, self.device_no]
        return "".join(f + "|" for f in fields)

    def to_json(self) -> dict[str, Any]:
        return {
            "region": self.region, "ssn": self.ssn, "card_no": self.card_no,
            "card_id": self.card_id.hex().upper(), "name": self.name,
            "atr_historical": self.historical.hex().upper(), "spec_version": self.spec_version,
            "issue_date": self.issue_date, "expiry_date": self.expiry_date,
            "terminal_no": self.terminal_no, "device_no": self.device_no,
            "generation": self.generation, "algorithm": self.algorithm.label,
            "compat": self.compat(),
        }

    def expired(self, today: dt.date | None = None) -> bool:
        try:
            end = dt.datetime.strptime(self.expiry_date, "%Y%m%d").date()
        except ValueError:
            return True  # fail closed: an unreadable expiry counts as expired
        return end < (today or dt.date.today())


@dataclass
class _Op:
    """State of one operation (worker thread)."""

    link: CardLink
    ex: Exchanger
    alg: Algorithm = Algorithm.DES3
    generation: int = 2
    region: str = ""
    card_id: bytes = b""
    cur_df: str = ""
    authenticated: set[str] = field(default_factory=set)
    pin_verified: bool = False
    genuine: bool = False  # INTERNAL AUTHENTICATE checked through the PSAM in this operation
    fci_algorithm: int | None = None

    @property
    def ref(self) -> CardRef:
        return CardRef(self.alg, self.region, identifiers.historical_bytes(self.link.atr))


@dataclass
class _HsmPending:
    atr: bytes
    card_id: bytes
    int_input: bytes
    int_plain: bytes
    ext_plain: bytes
    generation: int


@dataclass(frozen=True)
class TxnRecord:
    """A settlement as recorded on the chip (DF04/EF08, 28 bytes)."""

    seq: int
    terminal: str  # 12 digits
    time: str  # YYYYMMDDhhmmss
    account_fen: int
    self_pay_fen: int
    fund_fen: int
    txn_type: str = "2"  # medical settlement

    def __post_init__(self) -> None:
        try:
            self.encode()
        except (FieldError, ValueError, construct.ConstructError) as exc:
            raise SSCardError("INVALID_INPUT", f"chip record: {exc}") from None
        if min(self.account_fen, self.self_pay_fen, self.fund_fen) < 0:
            raise SSCardError("INVALID_INPUT", "chip record: negative amount")

    def encode(self) -> bytes:
        return filesystem.DF04_EF08.encode_fixed({
            "seq": self.seq & 0xFFFF, "txn_type": self.txn_type, "terminal": self.terminal,
            "time": self.time, "account_fen": self.account_fen, "self_pay_fen": self.self_pay_fen,
            "fund_fen": self.fund_fen})


@dataclass(frozen=True)
class SaleAuth:
    """What :meth:`CardSession.authorise_sale` got from the card (the backend's ``card_auth``)."""

    card_id: bytes
    historical: bytes
    algorithm: Algorithm
    cryptograms: tuple[bytes, ...]
    pin_verified: bool

    def card_auth(self, index: int) -> dict[str, str]:
        """The ``card_auth`` object of the ``index``-th challenge's message."""
        return {"card_sn": self.card_id.hex().upper(), "atr_hist": self.historical.hex().upper(),
                "alg": f"{int(self.algorithm):02d}", "cryptogram": self.cryptograms[index].hex().upper()}


def _sw_error(sw: int, what: str) -> SSCardError:
    return card_status(sw, what)


def _pin_error(sw: int) -> SSCardError:
    if sw & 0xFFF0 == 0x63C0:
        left = sw & 0x0F
        return SSCardError("PIN_BLOCKED") if left == 0 else SSCardError("PIN_WRONG", tries_left=left)
    if sw == 0x6983:
        return SSCardError("PIN_BLOCKED")
    return card_status(sw, "PIN")


class CardSession:
    """Operations on the card in ``card`` (see the module docstring)."""

    def __init__(self, card: Reader, psam: PsamClient | None = None, *,
                 pin_policy: PinPolicy | None = None, device_no: str = "",
                 trace: TraceHook | None = None):
        self.card = card
        self.psam = psam
        self.pin_policy = pin_policy or PinPolicy()
        self.device_no = device_no
        self.trace = trace
        self._hsm: _HsmPending | None = None

    # -- plumbing ---------------------------------------------------------------------------------

    async def _run(self, body: Callable[[_Op], T], reset_after: bool = False) -> T:
        def op(link: CardLink) -> T:
            ctx = _Op(link, Exchanger(link, "card", self.trace))
            try:
                return body(ctx)
            except _GARBAGE as exc:
                raise SSCardError("CARD_GARBAGE", type(exc).__name__) from None

        return await self.card.run(op, reset_after=reset_after)

    def _need_psam(self) -> PsamClient:
        if self.psam is None:
            raise SSCardError("NO_PSAM", "use the HSM two-step read (read_basic_hsm_step1/2)")
        return self.psam

    @staticmethod
    def _ok(ctx: _Op, apdu: A.CommandApdu | bytes, what: str) -> bytes:
        r = ctx.ex.send(apdu)
        if r.sw != SW_OK:
            raise _sw_error(r.sw, what)
        return r.data

    def _select_ssse(self, ctx: _Op) -> None:
        r = ctx.ex.send(A.select_aid(filesystem.SSSE_AID))
        if r.sw != SW_OK:
            raise SSCardError("NOT_SSCARD", f"SELECT SSSE answered {r.sw:04X}")
        try:
            fci = filesystem.parse_fci(r.data)
        except tlv.TlvError:
            raise SSCardError("NOT_SSCARD", "no FCI for SSSE") from None
        if fci.name and fci.name != filesystem.SSSE_AID:
            raise SSCardError("NOT_SSCARD", "FCI names another application")
        ctx.fci_algorithm = fci.algorithm
        if fci.algorithm in (None, 0x01):
            ctx.alg = Algorithm.DES3
        elif fci.algorithm == 0x03:
            ctx.alg = Algorithm.SM4
        else:
            raise SSCardError("PSAM_NO_ALGORITHM", f"card algorithm {fci.algorithm:02X} (SSF33)")
        ctx.cur_df = "SSSE"
        ctx.authenticated.clear()

    def _select_df(self, ctx: _Op, df: str) -> None:
        if df == "SSSE":
            if ctx.cur_df != "SSSE":
                self._select_ssse(ctx)
            return
        if ctx.cur_df == df:
            return
        spec = filesystem.ssse(ctx.generation).df(df)
        r = ctx.ex.send(A.select_aid(spec.aid))
        if r.sw != SW_OK:
            raise _sw_error(r.sw, f"SELECT {df}")
        ctx.cur_df = df
        ctx.authenticated.clear()

    def _select_ef(self, ctx: _Op, fid: int) -> None:
        self._ok(ctx, A.select_fid(fid), f"SELECT {fid:04X}")

    def _read_item(self, ctx: _Op, item: DataItem, occurrence: int = 1,
                   missing_ok: bool = False) -> Any:
        le = 2 + item.length
        r = ctx.ex.send(A.read_record(item.tag, 0, A.REC_FIRST_ID, le))
        for _ in range(occurrence - 1):
            if r.sw != SW_OK:
                break
            r = ctx.ex.send(A.read_record(item.tag, 0, A.REC_NEXT_ID, le))
        if r.sw == 0x6A83 and missing_ok:
            return "" if item.kind != "b" else b""
        if r.sw != SW_OK:
            raise _sw_error(r.sw, f"READ RECORD {item.tag:02X}")
        value = item.decode_record(r.data)
        if isinstance(value, str) and not _FORBIDDEN.isdisjoint(value):
            raise SSCardError("CARD_GARBAGE", f"item {item.tag:02X} holds separator or control characters")
        return value

    def _read_identity(self, ctx: _Op) -> tuple[bytes, str, str]:
        """SSSE, EF05: card id, spec version, card number; sets generation and region."""
        self._select_ssse(ctx)
        ef05 = filesystem.SSSE_EF05
        try:
            # A PSAM answers to the same name (sx1.sh.社会保障) but has no EF05.
            self._select_ef(ctx, 0xEF05)
            card_id = self._read_item(ctx, ef05.item(0x01))
        except SSCardError as exc:
            if exc.code != "CARD_STATUS":
                raise
            raise SSCardError("NOT_SSCARD", "no issuer data (EF05)") from None
        version = self._read_item(ctx, ef05.item(0x03))
        card_no = self._read_item(ctx, ef05.item(0x07))
        if len(card_id) != 16 or card_id[3:8] != identifiers.RID:
            raise SSCardError("BAD_CARD_ID")
        region = card_id[:3].hex()
        if not region.isdigit():
            raise SSCardError("BAD_CARD_ID", "region is not BCD")
        ctx.region, ctx.card_id = region, card_id
        ctx.generation = 3 if version.startswith("3") else 2
        if ctx.fci_algorithm is None and region.startswith("11"):
            # card-spec §2.2: Beijing cards without an algorithm tag use SSF33
            raise SSCardError("PSAM_NO_ALGORITHM", "SSF33 card (Beijing, no algorithm tag)")
        return card_id, version, card_no

    def _authenticate_card(self, ctx: _Op, psam: PsamClient) -> None:
        r1 = self._ok(ctx, A.get_challenge(8), "GET CHALLENGE")
        r2 = self._ok(ctx, A.get_challenge(8), "GET CHALLENGE")
        answer = self._ok(ctx, A.internal_authenticate(r2, r1), "INTERNAL AUTHENTICATE")
        expected = psam.auth_cryptogram(ctx.ref, "IRK", r2, r1)
        if len(answer) != 8 or not hmac.compare_digest(answer, expected):
            raise SSCardError("CARD_NOT_GENUINE")
        ctx.genuine = True

    def _external_auth(self, ctx: _Op, key: str, psam: PsamClient) -> None:
        """EXTERNAL AUTHENTICATE with ``key`` — only after the card proved genuine in this
        operation, so a wrong card (or wrong keys) never burns the card's key counters."""
        if key in ctx.authenticated:
            return
        if not ctx.genuine:
            self._authenticate_card(ctx, psam)
        plain = self._ok(ctx, A.get_challenge(8), "GET CHALLENGE")
        session_input = self._ok(ctx, A.get_challenge(8), "GET CHALLENGE")
        crypt = psam.auth_cryptogram(ctx.ref, key, session_input, plain)
        r = ctx.ex.send(A.external_authenticate(card_key_id(key), crypt, plain))
        if r.sw != SW_OK:
            raise _sw_error(r.sw, f"EXTERNAL AUTHENTICATE {key}")
        ctx.authenticated.add(key)

    def _verify_clear(self, ctx: _Op, pin: str) -> None:
        self.pin_policy.check_format(pin)
        body = crypto.pin_to_bcd(pin)
        r = ctx.ex.send(A.verify(body))
        if r.sw != SW_OK:
            raise _pin_error(r.sw)
        ctx.pin_verified = True

    # -- identity ------------------------------------------------------------------------------

    async def read_basic(self) -> BasicInfo:
        """``iReadCardBas``: identity fields plus the compat string; needs the PSAM."""
        def body(ctx: _Op) -> BasicInfo:
            card_id, version, card_no = self._read_identity(ctx)  # NOT_SSCARD before NO_PSAM
            psam = self._need_psam()
            self._authenticate_card(ctx, psam)
            if ctx.generation >= 3:
                self._external_auth(ctx, "RKSSSE", psam)
            info = self._finish_basic(ctx, card_id, version, card_no, psam.terminal_number())
            self._end_authenticated(ctx)
            return info

        return await self._run(body)

    def _finish_basic(self, ctx: _Op, card_id: bytes, version: str, card_no: str,
                      terminal_no: str) -> BasicInfo:
        ef05 = filesystem.SSSE_EF05
        self._select_ef(ctx, 0xEF05)
        issue = self._read_item(ctx, ef05.item(0x05))
        expiry = self._read_item(ctx, ef05.item(0x06))
        self._select_ef(ctx, 0xEF06)
        items = {it.tag: it for it in filesystem.SSSE_EF06_ITEMS}
        ssn = self._read_item(ctx, items[0x08])
        name = self._read_item(ctx, items[0x09])
        name += self._read_item(ctx, items[0x4E], missing_ok=True)  # absent on some 2.0 cards
        return BasicInfo(
            region=ctx.region, ssn=ssn, card_no=card_no[:9], card_id=card_id, name=name,
            historical=identifiers.historical_bytes(ctx.link.atr), spec_version=version,
            issue_date=issue, expiry_date=expiry, terminal_no=terminal_no,
            device_no=self.device_no, generation=ctx.generation, algorithm=ctx.alg)

    async def read_basic_hsm_step1(self) -> str:
        """``iReadCardBas_HSM_Step1``: what the HSM service needs, as the 8-field string."""

        def body(ctx: _Op) -> str:
            card_id, _, _ = self._read_identity(ctx)
            int_plain = self._ok(ctx, A.get_challenge(8), "GET CHALLENGE")
            int_input = self._ok(ctx, A.get_challenge(8), "GET CHALLENGE")
            ext_plain = ext_input = b""
            if ctx.generation >= 3:
                ext_plain = self._ok(ctx, A.get_challenge(8), "GET CHALLENGE")
                # the last challenge: the card derives the external-auth session key from it
                ext_input = self._ok(ctx, A.get_challenge(8), "GET CHALLENGE")
            self._hsm = _HsmPending(ctx.link.atr, card_id, int_input, int_plain, ext_plain,
                                    ctx.generation)
            fields = [ctx.region, identifiers.historical_bytes(ctx.link.atr).hex().upper(),
                      f"{int(ctx.alg):02X}", card_id.hex().upper(), int_input.hex().upper(),
                      int_plain.hex().upper(), ext_input.hex().upper(), ext_plain.hex().upper()]
            return "".join(f + "|" for f in fields)

        return await self._run(body)

    async def read_basic_hsm_step2(self, pkey: str, terminal_no: str = "000000000000") -> BasicInfo:
        """``iReadCardBas_HSM_Step2``: check the HSM's answers on the card, then read."""
        pending = self._hsm
        self._hsm = None
        if pending is None:
            raise SSCardError("INVALID_INPUT", "no HSM step 1 in progress")
        # card-spec §4.6: "<int 32 hex>|<ext 32 hex>|"; a 2.0 card gets the internal part only
        parts = pkey.split("|") if isinstance(pkey, str) and len(pkey) <= 128 else []
        if len(parts) == 2:
            parts.insert(1, "")
        if len(parts) != 3 or parts[2] != "" or len(parts[0]) != 32 or len(parts[1]) != (
                32 if pending.generation >= 3 else 0):
            raise SSCardError("BAD_CALCULATION_DATA", "pKey must be intData intPlain|extData extPlain|")
        try:
            int_data, int_plain = bytes.fromhex(parts[0][:16]), bytes.fromhex(parts[0][16:])
            ext = bytes.fromhex(parts[1]) if parts[1] else b""
        except ValueError:
            raise SSCardError("BAD_CALCULATION_DATA", "pKey is not hex") from None
        if int_plain != pending.int_plain or ext[8:] != pending.ext_plain:
            raise SSCardError("BAD_CALCULATION_DATA", "pKey answers other challenges")

        def body(ctx: _Op) -> BasicInfo:
            if ctx.link.atr != pending.atr:
                raise SSCardError("CARD_MISMATCH", "another card is in the reader")
            answer = self._ok(ctx, A.internal_authenticate(pending.int_input, pending.int_plain),
                              "INTERNAL AUTHENTICATE")
            if not hmac.compare_digest(answer, int_data):
                raise SSCardError("CARD_NOT_GENUINE")  # before any external auth: no tries burnt
            if pending.generation >= 3:
                r = ctx.ex.send(A.external_authenticate(0x0A, ext[:8], ext[8:]))
                if r.sw != SW_OK:
                    raise _sw_error(r.sw, "EXTERNAL AUTHENTICATE RKSSSE")
            card_id, version, card_no = self._read_identity_keep_auth(ctx)
            if card_id != pending.card_id:
                raise SSCardError("CARD_MISMATCH", "another card is in the reader")
            return self._finish_basic(ctx, card_id, version, card_no, terminal_no)

        return await self._run(body)

    def _read_identity_keep_auth(self, ctx: _Op) -> tuple[bytes, str, str]:
        # Re-selecting the SSSE would end the external authentication; the card still has it
        # selected from step 1, so only the EF is selected.
        ctx.cur_df = "SSSE"
        self._select_ef(ctx, 0xEF05)
        ef05 = filesystem.SSSE_EF05
        card_id = self._read_item(ctx, ef05.item(0x01))
        version = self._read_item(ctx, ef05.item(0x03))
        card_no = self._read_item(ctx, ef05.item(0x07))
        ctx.region, ctx.card_id = card_id[:3].hex(), card_id
        ctx.generation = 3 if version.startswith("3") else 2
        ctx.alg = Algorithm.SM4 if ctx.generation >= 3 else Algorithm.DES3
        return card_id, version, card_no

    async def status(self) -> dict[str, Any]:
        """Whether a card is present and what it is (no PSAM, no PIN)."""
        if not await self.card.present():
            return {"present": False}

        def body(ctx: _Op) -> dict[str, Any]:
            out: dict[str, Any] = {"present": True, "atr": ctx.link.atr.hex().upper()}
            try:
                _, version, card_no = self._read_identity(ctx)
            except SSCardError as exc:
                if exc.code != "NOT_SSCARD":
                    raise
                out["sscard"] = False
                return out
            out.update(sscard=True, generation=ctx.generation, spec_version=version,
                       algorithm=ctx.alg.label, card_no=card_no[:9], region=ctx.region)
            return out

        return await self._run(body)

    # -- files --------------------------------------------------------------------------------

    def _satisfy(self, ctx: _Op, ac: Any, pin: str | None, prefer: str) -> None:
        """Meet a read access condition: PIN (given), or a key through the PSAM."""
        if ac is PIN:
            if ctx.pin_verified:
                return
            if pin is None:
                if prefer != "pin" or not self.card.has_keypad:
                    raise SSCardError("INVALID_INPUT", "this file needs the PIN")
                res = ctx.link.keypad_verify(KEYPAD_TIMEOUT)
                _raise_keypad(res.status, res.sw)
                ctx.pin_verified = True
                return
            self._verify_clear(ctx, pin)
            return
        if isinstance(ac, Key):
            self._external_auth(ctx, ac.name, self._need_psam())
            return
        if isinstance(ac, AllOf):
            for t in ac.terms:
                self._satisfy(ctx, t, pin, prefer)
            return
        if isinstance(ac, AnyOf):
            terms = list(ac.terms)
            pin_first = prefer == "pin" or (self.psam is None and pin is not None)
            terms.sort(key=lambda t: (t is not PIN) if pin_first else (t is PIN))
            last: SSCardError | None = None
            for t in terms:
                if t is PIN and pin is None and not (prefer == "pin" and self.card.has_keypad):
                    continue
                try:
                    self._satisfy(ctx, t, pin, prefer)
                    return
                except SSCardError as exc:
                    # Only a host-side shortfall (no PSAM, no key in it) may fall back; after
                    # the card has answered, falling back would spend its tries.
                    if exc.code not in _PSAM_SHORTFALL:
                        raise
                    last = exc
            raise last or SSCardError("INVALID_INPUT", "this file needs the PIN or a key")

    def _check_card_info(self, ctx: _Op, card_info: str | None) -> None:
        """``pCardInfo`` of the reader interface: ``卡识别码|卡号|`` must match the card (−22)."""
        if card_info is None:
            return
        parts = card_info.split("|") if isinstance(card_info, str) else []
        if len(parts) != 3 or parts[2] != "":
            raise SSCardError("BAD_PARAMETER", "card info is 卡识别码|卡号|")
        card_no = self._read_item(ctx, filesystem.SSSE_EF05.item(0x07))
        if parts[0].upper() != ctx.card_id.hex().upper() or parts[1] != card_no[:9]:
            raise SSCardError("CARD_MISMATCH")

    def _end_authenticated(self, ctx: _Op) -> None:
        """Leave no external authentication behind for the next client of a shared reader:
        selecting the MF ends it (another application selected)."""
        if ctx.authenticated:
            ctx.ex.send(A.select_fid(filesystem.MF_FID, A.SELECT_BY_FID))
            ctx.authenticated.clear()

    async def read(self, address: str, *, pin: str | None = None, auth: str = "key",
                   card_info: str | None = None) -> str:
        """``iReadCard``: the address with values in place (see :mod:`sscardd.address`).

        ``auth``: how to meet "PIN or key" files — ``key`` through the PSAM, ``pin`` with ``pin``
        or, when ``pin`` is None, on the reader's keypad. ``card_info`` (``卡识别码|卡号|``)
        makes sure the right card is read.
        """
        if auth not in ("key", "pin"):
            raise SSCardError("BAD_PARAMETER", "auth must be 'key' or 'pin'")
        addr.parse(address)  # malformed addresses fail before the card is touched
        if pin is not None:
            self.pin_policy.check_format(pin)

        def body(ctx: _Op) -> str:
            self._read_identity(ctx)
            self._check_card_info(ctx, card_info)
            refs = addr.parse(address, ctx.generation)
            results = []
            for ref in refs:
                self._select_df(ctx, ref.df)
                self._select_ef(ctx, ref.ef.fid)
                if ref.ef.read is not FREE:
                    self._satisfy(ctx, ref.ef.read, pin, auth)
                results.append((ref, self._read_values(ctx, ref)))
            self._end_authenticated(ctx)
            return addr.format_result(results)

        return await self._run(body, reset_after=pin is not None or auth == "pin")

    def _read_values(self, ctx: _Op, ref: addr.FileRef) -> list[str]:
        ef = ref.ef
        if ef.structure is Structure.TRANSPARENT:
            data = bytearray()
            while len(data) < ef.size:
                chunk = min(0x80, ef.size - len(data))
                off = len(data)
                data += self._ok(ctx, A.READ_BINARY.build(off >> 8, off & 0xFF, le=chunk),
                                 "READ BINARY")
            return [bytes(data).hex().upper()]
        if ef.structure is Structure.CYCLIC:
            numbers = list(ref.records) or list(range(1, ef.records + 1))
            out = []
            for n in numbers:
                r = ctx.ex.send(A.read_record(n, 0, A.REC_NUMBER, ef.record_size))
                if r.sw == 0x6A83:
                    if ref.records:
                        out.append("")
                        continue
                    break
                if r.sw != SW_OK:
                    raise _sw_error(r.sw, f"READ RECORD {n}")
                out.append(_cyclic_text(ef, r.data))
            return out
        values = []
        for item_ref in ref.items:
            item = _item_or_raw(ef, item_ref.tag)
            v = self._read_item(ctx, item, item_ref.occurrence)
            values.append(v.hex().upper() if isinstance(v, bytes) else str(v))
        return values

    async def write(self, address: str, data: str, *, card_info: str | None = None) -> str:
        """``iWriteCard``: write values (same shape as a read result) under secure messaging,
        MACed by the PSAM. Everything is encoded and checked before the card is touched."""
        refs = addr.parse(address)
        values = addr.parse_values(data, refs)
        plan: list[tuple[addr.FileRef, str, int, int, int, bytes]] = []
        for ref, vals in zip(refs, values, strict=True):
            if ref.ef.structure is Structure.CYCLIC:
                raise SSCardError("UNSUPPORTED", f"{ref.name}: cyclic files are not written here")
            key = _write_key(ref.ef.write)
            if ref.ef.structure is Structure.TRANSPARENT:
                try:
                    raw = bytes.fromhex(vals[0])
                except ValueError:
                    raise SSCardError("INVALID_INPUT", f"{ref.name}: value is not hex") from None
                if not raw or len(raw) > min(ref.ef.size, 0xF0):
                    raise SSCardError("INVALID_INPUT", f"{ref.name}: 1..240 bytes")
                plan.append((ref, key, 0xD6, 0, 0, raw))
                continue
            for item_ref, text in zip(ref.items, vals, strict=True):
                if item_ref.occurrence != 1:
                    raise SSCardError("BAD_PARAMETER", f"{ref.name}|{item_ref.raw}: a write names "
                                      "the first record with a tag")
                item = _item_or_raw(ref.ef, item_ref.tag)
                try:
                    value: Any = bytes.fromhex(text) if item.kind == "b" else text
                    record = item.encode_record(value)
                except (FieldError, ValueError, construct.ConstructError) as exc:
                    raise SSCardError("INVALID_INPUT", f"{ref.name}|{item_ref.raw}: {exc}") from None
                plan.append((ref, key, 0xDC, item.tag, A.record_p2(0, A.REC_FIRST_ID), record))

        def body(ctx: _Op) -> str:
            self._read_identity(ctx)
            self._check_card_info(ctx, card_info)
            psam = self._need_psam()
            self._authenticate_card(ctx, psam)  # no MAC for a card that is not genuine
            for ref, key, ins, p1, p2, body_bytes in plan:
                self._select_df(ctx, ref.df)
                self._select_ef(ctx, ref.ef.fid)
                self._sm_write(ctx, psam, key, ins, p1, p2, body_bytes)
            return addr.format_result([(r, v) for r, v in zip(refs, values, strict=True)])

        return await self._run(body)

    def _sm_write(self, ctx: _Op, psam: PsamClient, key: str, ins: int, p1: int, p2: int,
                  body: bytes) -> None:
        challenge = self._ok(ctx, A.get_challenge(8), "GET CHALLENGE")
        header = bytes((0x04, ins, p1, p2, len(body) + 4))
        mac = psam.mac(ctx.ref, key, challenge, header + body)
        r = ctx.ex.send(header + body + mac)
        if r.sw != SW_OK:
            raise _sw_error(r.sw, f"write under {key}")

    async def record_settlement(self, record: TxnRecord, *, card_id: bytes | None = None) -> bool:
        """Record a settlement in DF04/EF08 (card-spec §2.7 project rule). False when the card
        refuses (a real card may); the settlement stands either way. With ``card_id``, the card in
        the reader must be that card (CARD_MISMATCH otherwise: nothing is written)."""
        psam = self._need_psam()

        def body(ctx: _Op) -> bool:
            cid, _, _ = self._read_identity(ctx)
            if card_id is not None and cid != card_id:
                raise SSCardError("CARD_MISMATCH", "another card is in the reader")
            self._select_df(ctx, "DF04")
            challenge = self._ok(ctx, A.get_challenge(8), "GET CHALLENGE")
            raw = record.encode()
            header = bytes((0x04, 0xDC, 0x00, A.record_p2(0x08, A.REC_PREV_ID), len(raw) + 4))
            mac = psam.mac(ctx.ref, "UK2DF04", challenge, header + raw)
            return ctx.ex.send(header + raw + mac).sw == SW_OK

        return await self._run(body)

    async def settlement_records(self, pin: str | None) -> list[dict[str, Any]]:
        """The chip's settlement log (DF04/EF08), newest first: ``seq``, ``txn_type``,
        ``terminal``, ``time`` (``YYYY-MM-DD HH:MM:SS``) and the amounts ``account``,
        ``self_pay``, ``fund`` in yuan (``"52.00"``). Reading it needs the PIN: ``pin`` from the
        caller, or ``None`` for the reader's keypad. Records never written (all ``FF``, or all
        ``00``) are left out. The card is reset afterwards."""
        if pin is not None:
            self.pin_policy.check_format(pin)

        def body(ctx: _Op) -> list[dict[str, Any]]:
            self._read_identity(ctx)
            ef = _ef_spec(ctx.generation, "DF04", 0xEF08)
            self._select_df(ctx, "DF04")
            self._select_ef(ctx, ef.fid)
            self._satisfy(ctx, ef.read, pin, "pin")
            out = []
            for n in range(1, ef.records + 1):  # record 1 is the newest of a cyclic file
                r = ctx.ex.send(A.read_record(n, 0, A.REC_NUMBER, ef.record_size))
                if r.sw == 0x6A83:
                    break
                if r.sw != SW_OK:
                    raise _sw_error(r.sw, f"READ RECORD {n}")
                if r.data in (b"\xff" * ef.record_size, bytes(ef.record_size)):
                    continue
                out.append(_txn_json(ef, r.data))
            return out

        return await self._run(body, reset_after=True)

    # -- sale --------------------------------------------------------------------------------

    async def authorise_sale(self, card_id: bytes, challenges: Sequence[tuple[bytes, bytes]], *,
                             pin: str | None = None, keypad: bool = False) -> SaleAuth:
        """One operation for a sale (architecture.md, "Every settlement carries the card's
        INTERNAL AUTHENTICATE answer"): check that the card read before (``card_id``) is still the
        one in the reader, verify the PIN (``pin``, or the reader's keypad) when asked, and have the
        card answer INTERNAL AUTHENTICATE for each ``(session_input, plain)`` of
        :func:`apdu_specs.sale_auth.sale_challenge`. An initial PIN verifies but cannot transact
        (PIN_INITIAL). The card is reset afterwards whenever a PIN was verified."""
        if pin is not None and keypad:
            raise ValueError("a PIN from the caller or the keypad, not both")
        if pin is not None:
            self.pin_policy.check_format(pin)
        if not challenges or any(len(si) != 8 or len(pl) != 8 for si, pl in challenges):
            raise ValueError("challenges are (8-byte session input, 8-byte plain) pairs")

        def body(ctx: _Op) -> SaleAuth:
            cid, _, _ = self._read_identity(ctx)
            if cid != card_id:
                raise SSCardError("CARD_MISMATCH", "another card is in the reader")
            verified = False
            if keypad:
                res = ctx.link.keypad_verify(KEYPAD_TIMEOUT)
                _raise_keypad(res.status, res.sw)
                verified = True
            elif pin is not None:
                self._verify_clear(ctx, pin)
                if pin in self.pin_policy.initial_pins:
                    raise SSCardError("PIN_INITIAL")
                verified = True
            answers = []
            for session_input, plain in challenges:
                answer = self._ok(ctx, A.internal_authenticate(session_input, plain), "INTERNAL AUTHENTICATE")
                if len(answer) != 8:
                    raise SSCardError("CARD_GARBAGE", "INTERNAL AUTHENTICATE answer is not 8 bytes")
                answers.append(answer)
            return SaleAuth(card_id=cid, historical=identifiers.historical_bytes(ctx.link.atr),
                            algorithm=ctx.alg, cryptograms=tuple(answers), pin_verified=verified)

        return await self._run(body, reset_after=keypad or pin is not None)

    # -- PIN ----------------------------------------------------------------------------------

    async def verify_pin(self, pin: str | None = None) -> None:
        """VERIFY on the chip: ``pin`` from the caller, or ``None`` for the reader's keypad."""
        if pin is not None:
            self.pin_policy.check_format(pin)

        def body(ctx: _Op) -> None:
            self._select_ssse(ctx)
            if pin is None:
                res = ctx.link.keypad_verify(KEYPAD_TIMEOUT)
                _raise_keypad(res.status, res.sw)
                return
            self._verify_clear(ctx, pin)
            if pin in self.pin_policy.initial_pins:
                raise SSCardError("PIN_INITIAL")

        await self._run(body, reset_after=True)

    async def change_pin(self, old: str | None = None, new: str | None = None,
                         new_again: str | None = None) -> None:
        """CHANGE PIN: three PINs from the caller, or none for the reader's keypad."""
        keypad = old is None and new is None and new_again is None
        if not keypad:
            if old is None or new is None or new_again is None:
                raise SSCardError("INVALID_INPUT", "old, new and new-again PINs are all needed")
            for p in (old, new, new_again):
                self.pin_policy.check_format(p)
            if new != new_again:
                raise SSCardError("PIN_MISMATCH")
            if new in self.pin_policy.initial_pins:
                raise SSCardError("PIN_TO_INITIAL")

        def body(ctx: _Op) -> None:
            self._select_ssse(ctx)
            if keypad:
                res = ctx.link.keypad_change(KEYPAD_TIMEOUT)
                _raise_keypad(res.status, res.sw)
                return
            assert old is not None and new is not None
            r = ctx.ex.send(A.change_pin(crypto.pin_to_bcd(old), crypto.pin_to_bcd(new)))
            if r.sw != SW_OK:
                raise _pin_error(r.sw)

        await self._run(body, reset_after=True)

    # -- service hall: PIN unblock / reload (PUK rights in the PSAM) ----------------------------

    async def unblock_pin(self) -> None:
        """PIN UNBLOCK (``84 24 00 00``, MAC only): resets the PIN try counter, the PIN stays.

        Authorised by EXTERNAL AUTHENTICATE with PUK through the PSAM, after the card proved
        genuine; the MAC is under the session key of STKSSSE and the card's last challenge. A
        PSAM without PUK rights: PSAM_KEY_LEVEL, before the card's PUK counter is touched."""

        def body(ctx: _Op) -> None:
            self._pin_maintenance(ctx, 0x00, None)

        await self._run(body, reset_after=True)

    async def reload_pin(self, new_pin: str) -> None:
        """PIN RELOAD (``84 24 00 01``): sets the PIN to ``new_pin`` (and resets its try
        counter) with ``enc(LD ‖ PIN_BCD) ‖ MAC``, authorised like :meth:`unblock_pin`. The new
        PIN follows the PIN policy (PIN_LENGTH) and may not be an initial PIN (PIN_TO_INITIAL);
        both are checked before the card is touched."""
        self.pin_policy.check_format(new_pin)
        if new_pin in self.pin_policy.initial_pins:
            raise SSCardError("PIN_TO_INITIAL")

        def body(ctx: _Op) -> None:
            self._pin_maintenance(ctx, 0x01, crypto.reload_pin_block(new_pin))

        await self._run(body, reset_after=True)

    def _pin_maintenance(self, ctx: _Op, p2: int, pin_block: bytes | None) -> None:
        """84 24 00 ``p2``: unblock (``pin_block`` None) or reload (card-spec §3.1, §4.4)."""
        self._read_identity(ctx)  # NOT_SSCARD before NO_PSAM
        psam = self._need_psam()
        if pin_block is not None and len(pin_block) + 1 > ctx.alg.block_size:
            # the reload carries one enciphered block (Lc 0C for 3DES, 14 for SM4)
            raise SSCardError("PIN_LENGTH", f"a reloaded PIN fits one {ctx.alg.label} block")
        self._select_df(ctx, "SSSE")
        self._external_auth(ctx, "PUK", psam)  # internal authentication first
        challenge = self._ok(ctx, A.get_challenge(8), "GET CHALLENGE")
        what = "PIN UNBLOCK" if pin_block is None else "PIN RELOAD"
        header = bytes((A.PIN_UNBLOCK_RELOAD.cla, A.PIN_UNBLOCK_RELOAD.ins, 0x00, p2))
        if pin_block is None:
            data = psam.mac(ctx.ref, "STKSSSE", challenge, header + b"\x04")
        else:
            data = psam.encrypt_mac(ctx.ref, "STKSSSE", challenge, header, pin_block)
        r = ctx.ex.send(header + bytes((len(data),)) + data)
        if r.sw != SW_OK:
            raise _sw_error(r.sw, what)


def _raise_keypad(status: KeypadStatus, sw: int) -> None:
    if status in (KeypadStatus.OK, KeypadStatus.INITIAL_PIN) and sw != SW_OK:
        # a reader claiming success with a failing status word is not believed
        raise _pin_error(sw) if sw & 0xFFF0 == 0x63C0 or sw == 0x6983 else SSCardError(
            "CARD_GARBAGE", "keypad reader reported success with a failing status word")
    if status is KeypadStatus.OK:
        return
    if status is KeypadStatus.CARD_STATUS:
        raise _pin_error(sw)
    raise SSCardError({
        KeypadStatus.CANCELLED: "PIN_CANCELLED", KeypadStatus.TIMEOUT: "PIN_TIMEOUT",
        KeypadStatus.BAD_LENGTH: "PIN_LENGTH", KeypadStatus.MISMATCH: "PIN_MISMATCH",
        KeypadStatus.INITIAL_PIN: "PIN_INITIAL", KeypadStatus.TO_INITIAL: "PIN_TO_INITIAL",
    }[status])


def _write_key(ac: Any) -> str:
    key = sm_key(ac)
    if key is None:
        raise SSCardError("UNSUPPORTED", "this file cannot be written")
    return key


def _item_or_raw(ef: filesystem.EfSpec, tag: int) -> DataItem:
    """The declared item, or a raw binary item for the free-form records of DF02/DF03."""
    for it in ef.items:
        if it.tag == tag:
            return it
    return _RawItem(tag, f"item_{tag:02X}", "b", 0)


class _RawItem(DataItem):
    """A record whose length the card tells (READ RECORD answers 6Cxx, handled in transport)."""

    def decode_value(self, raw: bytes) -> Any:
        return raw

    def encode_value(self, value: Any) -> bytes:
        if not isinstance(value, bytes) or len(value) > 0xF9:
            # tag + length + value + 4-byte MAC must fit a short APDU's 255 data bytes
            raise FieldError("a free-form record value is up to 249 bytes")
        return value


def _ef_spec(generation: int, df: str, fid: int) -> filesystem.EfSpec:
    for ef in filesystem.ssse(generation).df(df).efs:
        if ef.fid == fid:
            return ef
    raise KeyError(f"{df} has no {fid:04X}")


def _yuan(fen: int) -> str:
    return f"{fen // 100}.{fen % 100:02d}"


def _txn_json(ef: filesystem.EfSpec, record: bytes) -> dict[str, Any]:
    """A DF04/EF08 record as :meth:`CardSession.settlement_records` returns it."""
    v = ef.decode_fixed(record)
    txn_type, terminal, time = str(v["txn_type"]), str(v["terminal"]), str(v["time"])
    if len(txn_type) != 1 or not txn_type.isprintable() or not _FORBIDDEN.isdisjoint(txn_type) \
            or len(terminal) != 12 or len(time) != 14:
        raise SSCardError("CARD_GARBAGE", "settlement record with a bad type, terminal or time")
    when = dt.datetime.strptime(time, "%Y%m%d%H%M%S")  # ValueError: CARD_GARBAGE
    return {"seq": int(v["seq"]), "txn_type": txn_type, "terminal": terminal,
            "time": when.strftime("%Y-%m-%d %H:%M:%S"), "account": _yuan(int(v["account_fen"])),
            "self_pay": _yuan(int(v["self_pay_fen"])), "fund": _yuan(int(v["fund_fen"]))}


def _cyclic_text(ef: filesystem.EfSpec, record: bytes) -> str:
    values = ef.decode_fixed(record)
    out = []
    for k, v in values.items():
        if k.endswith("_fen"):
            v = f"{int(v) // 100}.{int(v) % 100:02d}"
        out.append(f"{v}^")
    return "".join(out)
