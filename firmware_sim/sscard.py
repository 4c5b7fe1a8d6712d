"""The emulated social security card: file tree, access conditions, PIN, keys, secure messaging.

The tree and its access rules come from :mod:`apdu_specs.filesystem`; the content, card keys and
counters from a :class:`~firmware_sim.image.CardImage`. Every change to persistent content is
committed to the image store before the card answers, the way a chip writes EEPROM before it
returns ``90 00``; if the commit fails the in-memory state is rolled back and the card answers
``6581``.

Security state (volatile): PIN verified until power-off/reset; keys authenticated by EXTERNAL
AUTHENTICATE until power-off/reset or selection of another DF; the last GET CHALLENGE, usable
once.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field

from apdu_specs import apdu as A
from apdu_specs import crypto, filesystem, status, tlv
from apdu_specs.access import FREE, NEVER, PIN, SM, Access, AllOf, AnyOf, Key, sm_key
from apdu_specs.apdu import CommandApdu
from apdu_specs.crypto import Algorithm
from apdu_specs.filesystem import DfSpec, EfSpec, Structure
from apdu_specs.status import SW, StatusWordError
from firmware_sim.cos import Cos, LePolicy, ResponseMode, check_lc, check_p1p2, read_slice
from firmware_sim.image import CardImage, FileContent
from firmware_sim.store import TearSafeStore

log = logging.getLogger(__name__)


def _fail(sw: int) -> StatusWordError:
    return StatusWordError(sw)


@dataclass
class DfNode:
    spec: DfSpec | None  # None: the MF
    path: str
    fid: int
    aid: bytes
    parent: DfNode | None = None
    efs: dict[int, EfNode] = field(default_factory=dict)
    dfs: list[DfNode] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.spec.name if self.spec else "MF"


@dataclass
class EfNode:
    spec: EfSpec
    path: str
    df: DfNode
    content: FileContent


class SocialSecurityCard(Cos):
    """A generation-2 or -3 social security card (see the module docstring)."""

    def __init__(self, image: CardImage, store: TearSafeStore | None = None,
                 mode: ResponseMode = ResponseMode.DIRECT):
        super().__init__(mode)
        self.image = image
        self.store = store
        self.alg = Algorithm(image.algorithm)
        self.mf = self._build_tree()
        self._key_ids = {(self._key_scope(k.name), k.key_id): k.name for k in image.keys.values()}
        self.cur_df: DfNode = self.mf
        self.cur_ef: EfNode | None = None
        self.pin_verified = False
        self.authenticated: set[str] = set()
        self._rec_ptr: int | None = None  # record pointer (index) for next/previous by id
        r = self.register
        r(A.SELECT, self._select)
        r(A.READ_BINARY, self._read_binary, LePolicy.HANDLER)
        r(A.READ_RECORD, self._read_record, LePolicy.EXACT)
        r(A.UPDATE_BINARY, self._update_binary)
        r(A.UPDATE_RECORD, self._update_record)
        r(A.VERIFY, self._verify)
        r(A.CHANGE_PIN, self._change_pin)
        r(A.PIN_UNBLOCK_RELOAD, self._unblock_reload)
        r(A.GET_CHALLENGE, self._get_challenge, LePolicy.HANDLER)
        r(A.INTERNAL_AUTHENTICATE, self._internal_auth)
        r(A.EXTERNAL_AUTHENTICATE, self._external_auth)
        r(A.APPLICATION_BLOCK, self._app_block)
        r(A.CARD_BLOCK, self._card_block)

    # -- construction --------------------------------------------------------------------------

    def _build_tree(self) -> DfNode:
        mf = DfNode(None, "MF", filesystem.MF_FID, b"")
        ssse_spec = filesystem.ssse(self.image.generation)
        mf.dfs.append(self._build_df(ssse_spec, mf, "SSSE"))
        return mf

    def _build_df(self, spec: DfSpec, parent: DfNode, path: str) -> DfNode:
        node = DfNode(spec, path, spec.fid, spec.aid, parent)
        for ef in spec.efs:
            ef_path = f"{path}/{ef.name}"
            content = self.image.files.get(ef_path)
            if content is None:
                content = FileContent(data=bytearray(ef.size)) \
                    if ef.structure is Structure.TRANSPARENT else FileContent(records=[])
                self.image.files[ef_path] = content
            node.efs[ef.fid] = EfNode(ef, ef_path, node, content)
        for sub in spec.dfs:
            node.dfs.append(self._build_df(sub, node, f"{path}/{sub.name}"))
        return node

    @staticmethod
    def _key_scope(name: str) -> str:
        """Key ids < 0x80 are SSSE-level; DF-level ids are per DF (``UK2DF04`` → ``DF04``)."""
        return name[-4:] if name[-4:-2] == "DF" else "SSSE"

    @property
    def atr(self) -> bytes:
        return self.image.atr

    def _reset_volatile(self) -> None:
        super()._reset_volatile()
        self.cur_df = self.mf
        self.cur_ef = None
        self.pin_verified = False
        self.authenticated = set()
        self._rec_ptr = None

    # -- persistence ---------------------------------------------------------------------------

    def _commit(self, before: CardImage) -> None:
        """Write the image; on failure restore ``before`` and answer 6581."""
        if self.store is None:
            return
        try:
            self.store.save(self.image.to_json())
        except OSError:
            log.exception("card image write failed; state rolled back")
            self._restore(before)
            raise _fail(SW.MEMORY_FAILURE) from None

    def _snapshot(self) -> CardImage:
        """What :meth:`_commit` restores if the store fails. Without a store nothing can fail, and
        nothing is copied (a deep copy of the image was a quarter of the card's time per write)."""
        return self.image if self.store is None else copy.deepcopy(self.image)

    def _restore(self, before: CardImage) -> None:
        self.image = before
        cur_df_path = self.cur_df.path
        cur_ef_path = self.cur_ef.path if self.cur_ef else None
        self.mf = self._build_tree()
        self.cur_df = self._find_df_path(cur_df_path) or self.mf
        self.cur_ef = None
        if cur_ef_path:
            for ef in self.cur_df.efs.values():
                if ef.path == cur_ef_path:
                    self.cur_ef = ef

    def _find_df_path(self, path: str) -> DfNode | None:
        stack = [self.mf]
        while stack:
            n = stack.pop()
            if n.path == path:
                return n
            stack.extend(n.dfs)
        return None

    # -- checks shared by commands -------------------------------------------------------------

    def precheck(self, apdu: CommandApdu) -> None:
        if self.image.card_blocked:
            raise _fail(SW.FUNCTION_NOT_SUPPORTED)
        if apdu.ins != A.SELECT.ins and self._app_blocked(self.cur_df):
            raise _fail(SW.APPLICATION_BLOCKED)

    def _app_blocked(self, df: DfNode) -> bool:
        return df.path in self.image.blocked_apps

    def _satisfied(self, ac: Access, sm_key: str | None = None) -> bool:
        if ac is FREE:
            return True
        if ac is NEVER:
            return False
        if ac is PIN:
            return self.pin_verified
        if isinstance(ac, Key):
            return ac.name in self.authenticated or sm_key == ac.name
        if isinstance(ac, SM):
            return sm_key == ac.name
        if isinstance(ac, AnyOf):
            return any(self._satisfied(t, sm_key) for t in ac.terms)
        if isinstance(ac, AllOf):
            return all(self._satisfied(t, sm_key) for t in ac.terms)
        return False

    def _key(self, name: str) -> bytes:
        entry = self.image.keys.get(name)
        if entry is None:
            raise _fail(SW.REFERENCE_NOT_FOUND)
        return entry.value

    def _take_challenge(self) -> bytes:
        ch = self.challenge
        self.challenge = None  # usable once, whatever the outcome
        if ch is None:
            raise _fail(SW.REFERENCE_DATA_INVALID)
        return ch

    def _verify_sm(self, apdu: CommandApdu, key_name: str) -> bytes:
        """Check the 4-byte MAC of a CLA-04 command; returns the data without the MAC."""
        if len(apdu.data) < 4:
            raise _fail(SW.SM_DATA_WRONG)
        body, mac = apdu.data[:-4], apdu.data[-4:]
        ch = self._take_challenge()
        sk = crypto.session_key(self.alg, self._key(key_name), ch)
        header = bytes((apdu.cla, apdu.ins, apdu.p1, apdu.p2, len(apdu.data)))
        if crypto.mac(self.alg, sk, header + body) != mac:
            raise _fail(SW.MAC_INVALID)
        return body

    # -- SELECT ----------------------------------------------------------------------------------

    def _select(self, apdu: CommandApdu) -> bytes:
        if apdu.p2 not in (A.SELECT_BY_FID, A.SELECT_NO_FCI, 0x02):
            raise _fail(SW.WRONG_P1P2)
        want_fci = apdu.p2 != A.SELECT_NO_FCI
        if apdu.p1 == A.SELECT_BY_NAME:
            if not 5 <= len(apdu.data) <= 16:
                raise _fail(SW.WRONG_LENGTH)
            if apdu.p2 == 0x02:  # "next occurrence": names are unique here
                raise _fail(SW.FILE_NOT_FOUND)
            df = self._find_df(lambda d: d.aid == apdu.data)
            if df is None:
                raise _fail(SW.FILE_NOT_FOUND)
            return self._enter_df(df, want_fci)
        if apdu.p1 == A.SELECT_BY_FID:
            if not apdu.data or apdu.data == b"\x3f\x00":
                return self._enter_df(self.mf, want_fci)
            check_lc(apdu, 2)
            fid = int.from_bytes(apdu.data, "big")
            for d in self.cur_df.dfs:
                if d.fid == fid:
                    return self._enter_df(d, want_fci)
            if fid in self.cur_df.efs:  # accepted with P1=00 too (seen in the wild)
                return self._enter_ef(self.cur_df.efs[fid])
            raise _fail(SW.FILE_NOT_FOUND)
        if apdu.p1 == A.SELECT_EF:
            check_lc(apdu, 2)
            fid = int.from_bytes(apdu.data, "big")
            ef = self.cur_df.efs.get(fid)
            if ef is None:
                raise _fail(SW.FILE_NOT_FOUND)
            return self._enter_ef(ef)
        raise _fail(SW.WRONG_P1P2)

    def _find_df(self, pred: object) -> DfNode | None:
        stack = [self.mf]
        while stack:
            n = stack.pop()
            if n is not self.mf and pred(n):  # type: ignore[operator]
                return n
            stack.extend(n.dfs)
        return None

    def _enter_df(self, df: DfNode, want_fci: bool) -> bytes:
        if self._app_blocked(df):
            raise _fail(SW.APPLICATION_BLOCKED)
        if df is not self.cur_df:
            self.authenticated = set()  # external auth lasts while the DF does not change
        self.cur_df = df
        self.cur_ef = None
        self._rec_ptr = None
        if not want_fci:
            return b""
        if df is self.mf:
            return filesystem.fci_mf()
        assert df.spec is not None
        if df.spec.algorithm_in_fci:
            return filesystem.fci_ddf(df.aid, self.image.algorithm)
        return filesystem.fci_adf(df.aid)

    def _enter_ef(self, ef: EfNode) -> bytes:
        self.cur_ef = ef
        self._rec_ptr = None
        return b""

    # -- record files ----------------------------------------------------------------------------

    def _ef_for_record(self, p2: int) -> EfNode:
        sfi = p2 >> 3
        if sfi == 0:
            if self.cur_ef is None:
                raise _fail(SW.NO_CURRENT_EF)
            ef = self.cur_ef
        else:
            found = [e for e in self.cur_df.efs.values() if e.spec.sfi == sfi]
            if not found:
                raise _fail(SW.FILE_NOT_FOUND)
            ef = found[0]
            if ef is not self.cur_ef:
                self.cur_ef = ef
                self._rec_ptr = None
        if ef.spec.structure is Structure.TRANSPARENT:
            raise _fail(SW.INCOMPATIBLE_FILE_STRUCTURE)
        return ef

    def _read_record(self, apdu: CommandApdu) -> bytes:
        if apdu.data:
            raise _fail(SW.WRONG_LENGTH)
        ef = self._ef_for_record(apdu.p2)
        if not self._satisfied(ef.spec.read):
            raise _fail(SW.SECURITY_STATUS_NOT_SATISFIED)
        recs = ef.content.records
        assert recs is not None
        mode, p1 = apdu.p2 & 0x07, apdu.p1
        if mode == A.REC_NUMBER:
            if p1 == 0:
                if self._rec_ptr is None:
                    raise _fail(SW.RECORD_NOT_FOUND)
                return recs[self._rec_ptr]
            if p1 > len(recs):
                raise _fail(SW.RECORD_NOT_FOUND)
            self._rec_ptr = p1 - 1
            return recs[p1 - 1]
        if mode == A.REC_FROM_P1:
            if p1 == 0 or p1 > len(recs):
                raise _fail(SW.RECORD_NOT_FOUND)
            return b"".join(recs[p1 - 1 :])
        if mode == A.REC_TO_P1:
            if p1 == 0 or p1 > len(recs):
                raise _fail(SW.RECORD_NOT_FOUND)
            return b"".join(reversed(recs[p1 - 1 :]))
        if mode in (A.REC_FIRST_ID, A.REC_LAST_ID, A.REC_NEXT_ID, A.REC_PREV_ID):
            if ef.spec.structure is not Structure.LINEAR_VARIABLE:
                raise _fail(SW.INCOMPATIBLE_FILE_STRUCTURE)
            idx = self._find_by_id(recs, p1, mode)
            self._rec_ptr = idx
            return recs[idx]
        raise _fail(SW.WRONG_P1P2)

    def _find_by_id(self, recs: list[bytes], tag: int, mode: int) -> int:
        hits = [i for i, r in enumerate(recs) if r and r[0] == tag]
        if not hits:
            raise _fail(SW.RECORD_NOT_FOUND)
        ptr = self._rec_ptr
        if mode == A.REC_FIRST_ID:
            return hits[0]
        if mode == A.REC_LAST_ID:
            return hits[-1]
        if mode == A.REC_NEXT_ID:
            later = [i for i in hits if ptr is None or i > ptr]
            if not later:
                raise _fail(SW.RECORD_NOT_FOUND)
            return later[0]
        earlier = [i for i in hits if ptr is None or i < ptr]
        if not earlier:
            raise _fail(SW.RECORD_NOT_FOUND)
        return earlier[-1]

    def _update_record(self, apdu: CommandApdu) -> bytes:
        ef = self._ef_for_record(apdu.p2)
        body, sm_key = self._write_body(apdu, ef)
        if not self._satisfied(ef.spec.write, sm_key):
            raise _fail(SW.SECURITY_STATUS_NOT_SATISFIED)
        spec = ef.spec
        recs = ef.content.records
        assert recs is not None
        mode, p1 = apdu.p2 & 0x07, apdu.p1
        if spec.structure is Structure.LINEAR_VARIABLE:
            self._check_tlv_record(spec, body)
        elif len(body) != spec.record_size:
            raise _fail(SW.WRONG_LENGTH)
        before = self._snapshot()
        recs = ef.content.records
        assert recs is not None
        if spec.structure is Structure.CYCLIC:
            if mode == A.REC_PREV_ID and p1 == 0:
                # ISO 7816-4 "previous" on a cyclic file: the oldest record is replaced and
                # becomes record 1 (the newest).
                if len(recs) >= spec.records:
                    recs.pop()
                recs.insert(0, body)
            elif mode == A.REC_NUMBER and p1 != 0 and not isinstance(spec.write, SM):
                # A log written only by secure messaging (DF04/EF08) only ever appends: no
                # holder of the write key may rewrite its history record by record.
                if p1 > len(recs):
                    raise _fail(SW.RECORD_NOT_FOUND)
                recs[p1 - 1] = body
            else:
                raise _fail(SW.WRONG_P1P2)
        elif mode == A.REC_NUMBER and p1 != 0:
            if p1 <= len(recs):
                recs[p1 - 1] = body
            elif p1 == len(recs) + 1:
                if len(recs) >= self._capacity(spec):
                    raise _fail(SW.NOT_ENOUGH_SPACE)
                recs.append(body)  # a linear file appends at the next record number
            else:
                raise _fail(SW.RECORD_NOT_FOUND)
        elif mode == A.REC_FIRST_ID and p1 != 0 and spec.structure is Structure.LINEAR_VARIABLE:
            if body[0] != p1:
                raise _fail(SW.LC_TLV_MISMATCH)
            idx = self._find_by_id(recs, p1, A.REC_FIRST_ID)
            recs[idx] = body
        else:
            raise _fail(SW.WRONG_P1P2)
        self._commit(before)
        return b""

    @staticmethod
    def _capacity(spec: EfSpec) -> int:
        return max(len(spec.items), 1) * 2 if spec.items else 16

    @staticmethod
    def _check_tlv_record(spec: EfSpec, body: bytes) -> None:
        try:
            tag, value = tlv.decode_record(body)
        except tlv.TlvError:
            raise _fail(SW.LC_TLV_MISMATCH) from None
        if spec.items:
            try:
                item = spec.item(tag)
            except KeyError:
                raise _fail(SW.WRONG_DATA) from None
            if len(value) != item.length:
                raise _fail(SW.LC_TLV_MISMATCH)
        elif len(body) > spec.record_size:
            raise _fail(SW.WRONG_LENGTH)

    def _write_body(self, apdu: CommandApdu, ef: EfNode) -> tuple[bytes, str | None]:
        if not apdu.data:
            raise _fail(SW.WRONG_LENGTH)
        if not apdu.secure_messaging:
            return apdu.data, None
        key = sm_key(ef.spec.write)
        if key is None:
            raise _fail(SW.CONDITIONS_NOT_SATISFIED)
        return self._verify_sm(apdu, key), key

    # -- transparent files -----------------------------------------------------------------------

    def _binary_target(self, apdu: CommandApdu) -> tuple[EfNode, int]:
        if apdu.p1 & 0x80:
            if apdu.p1 & 0x60:
                raise _fail(SW.WRONG_P1P2)
            sfi = apdu.p1 & 0x1F
            found = [e for e in self.cur_df.efs.values() if e.spec.sfi == sfi]
            if not found:
                raise _fail(SW.FILE_NOT_FOUND)
            self.cur_ef = found[0]
            offset = apdu.p2
        else:
            if self.cur_ef is None:
                raise _fail(SW.NO_CURRENT_EF)
            offset = (apdu.p1 << 8) | apdu.p2
        ef = self.cur_ef
        if ef.spec.structure is not Structure.TRANSPARENT:
            raise _fail(SW.INCOMPATIBLE_FILE_STRUCTURE)
        return ef, offset

    def _read_binary(self, apdu: CommandApdu) -> bytes:
        if apdu.data:
            raise _fail(SW.WRONG_LENGTH)
        ef, offset = self._binary_target(apdu)
        if not self._satisfied(ef.spec.read):
            raise _fail(SW.SECURITY_STATUS_NOT_SATISFIED)
        data = ef.content.data
        assert data is not None
        return read_slice(bytes(data), offset, apdu.le)

    def _update_binary(self, apdu: CommandApdu) -> bytes:
        ef, offset = self._binary_target(apdu)
        body, sm_key = self._write_body(apdu, ef)
        if not self._satisfied(ef.spec.write, sm_key):
            raise _fail(SW.SECURITY_STATUS_NOT_SATISFIED)
        data = ef.content.data
        assert data is not None
        if offset + len(body) > len(data):
            raise _fail(SW.OFFSET_BEYOND_EF if offset >= len(data) else SW.WRONG_LENGTH)
        before = self._snapshot()
        target = ef.content.data
        assert target is not None
        target[offset : offset + len(body)] = body
        self._commit(before)
        return b""

    # -- PIN ------------------------------------------------------------------------------------

    def _verify(self, apdu: CommandApdu) -> bytes:
        check_p1p2(apdu, 0, 0)
        pin = self.image.pin
        if not apdu.data:
            if pin.tries == 0:
                raise _fail(SW.AUTH_METHOD_BLOCKED)
            if self.pin_verified:
                return b""
            raise StatusWordError(status.tries_left(pin.tries))
        if not 2 <= len(apdu.data) <= 8:
            raise _fail(SW.WRONG_LENGTH)
        self._check_pin_attempt(apdu.data)
        self.pin_verified = True
        return b""

    def _check_pin_attempt(self, pin_bcd: bytes) -> None:
        """Compare a PIN; a changed counter is committed before the card answers anything."""
        pin = self.image.pin
        if pin.tries == 0:
            raise _fail(SW.AUTH_METHOD_BLOCKED)
        if not _valid_pin_bcd(pin_bcd):
            raise _fail(SW.WRONG_DATA)
        ok = pin.matches(pin_bcd)
        left = pin.max_tries if ok else pin.tries - 1
        if left != pin.tries:
            before = self._snapshot()
            self.image.pin.tries = left
            self._commit(before)
        if not ok:
            self.pin_verified = False
            raise StatusWordError(status.tries_left(left))

    def _change_pin(self, apdu: CommandApdu) -> bytes:
        check_p1p2(apdu, 0x01, 0x00)
        if not 3 <= len(apdu.data) <= 0x11:
            raise _fail(SW.WRONG_LENGTH)
        sep = apdu.data.find(b"\xff")
        if sep <= 0:
            raise _fail(SW.WRONG_DATA)
        old, new = apdu.data[:sep], apdu.data[sep + 1 :]
        if not _valid_pin_bcd(new) or len(crypto.bcd_to_pin(new)) < 4 or len(new) > 8:
            raise _fail(SW.WRONG_DATA)
        self._check_pin_attempt(old)
        before = self._snapshot()
        self.image.pin.set(new)
        self._commit(before)
        self.pin_verified = True
        return b""

    def _unblock_reload(self, apdu: CommandApdu) -> bytes:
        if apdu.p1 != 0 or apdu.p2 not in (0, 1):
            raise _fail(SW.WRONG_P1P2)
        if "PUK" not in self.authenticated:
            raise _fail(SW.SECURITY_STATUS_NOT_SATISFIED)
        bs = self.alg.block_size
        if apdu.p2 == 0:
            check_lc(apdu, 4)
        else:
            check_lc(apdu, bs + 4)
        ch = self._take_challenge()
        sk = crypto.session_key(self.alg, self._key("STKSSSE"), ch)
        body, mac = apdu.data[:-4], apdu.data[-4:]
        header = bytes((apdu.cla, apdu.ins, apdu.p1, apdu.p2, len(apdu.data)))
        if crypto.mac(self.alg, sk, header + body) != mac:
            raise _fail(SW.MAC_INVALID)
        before = self._snapshot()
        if apdu.p2 == 1:
            try:
                new = crypto.decrypt(self.alg, sk, body)
            except crypto.CryptoError:
                raise _fail(SW.WRONG_DATA) from None
            # As CHANGE PIN: at most 8 BCD bytes, or VERIFY could never present the new PIN.
            if not _valid_pin_bcd(new) or len(crypto.bcd_to_pin(new)) < 4 or len(new) > 8:
                raise _fail(SW.WRONG_DATA)
            self.image.pin.set(new)
        else:
            self.image.pin.tries = self.image.pin.max_tries
        self._commit(before)
        return b""

    # -- authentication -------------------------------------------------------------------------

    def _internal_auth(self, apdu: CommandApdu) -> bytes:
        check_p1p2(apdu, 0, 0)
        check_lc(apdu, 16, 17)
        return crypto.auth_data(self.alg, self._key("IRK"), apdu.data[:8], apdu.data[8:16])

    def _external_auth(self, apdu: CommandApdu) -> bytes:
        if apdu.p1 != 0:
            raise _fail(SW.WRONG_P1P2)
        check_lc(apdu, 16, 17)
        scope = "SSSE" if apdu.p2 < 0x80 else self.cur_df.name
        name = self._key_ids.get((scope, apdu.p2))
        if name is None or name == "IRK":
            raise _fail(SW.REFERENCE_NOT_FOUND)
        entry = self.image.keys[name]
        if entry.tries == 0:
            raise _fail(SW.AUTH_METHOD_BLOCKED)
        ch = self._take_challenge()
        expected = crypto.auth_data(self.alg, entry.value, ch, apdu.data[8:16])
        ok = expected == apdu.data[:8]
        left = entry.max_tries if ok else entry.tries - 1
        if left != entry.tries:
            before = self._snapshot()
            self.image.keys[name].tries = left
            self._commit(before)
        if not ok:
            self.authenticated.discard(name)
            raise StatusWordError(status.tries_left(left))
        self.authenticated.add(name)
        return b""

    # -- blocking -------------------------------------------------------------------------------

    def _mac_only(self, apdu: CommandApdu, key_name: str) -> None:
        check_lc(apdu, 4)
        ch = self._take_challenge()
        sk = crypto.session_key(self.alg, self._key(key_name), ch)
        header = bytes((apdu.cla, apdu.ins, apdu.p1, apdu.p2, 4))
        if crypto.mac(self.alg, sk, header) != apdu.data:
            raise _fail(SW.MAC_INVALID)

    def _app_block(self, apdu: CommandApdu) -> bytes:
        check_p1p2(apdu, 0x00, 0x01)
        df = self.cur_df
        if df is self.mf:
            raise _fail(SW.CONDITIONS_NOT_SATISFIED)
        key = "STKSSSE" if df.name == "SSSE" else f"STK{df.name}"
        self._mac_only(apdu, key)
        before = self._snapshot()
        self.image.blocked_apps.add(df.path)
        self._commit(before)
        return b""

    def _card_block(self, apdu: CommandApdu) -> bytes:
        check_p1p2(apdu, 0x00, 0x00)
        self._mac_only(apdu, "BK")
        before = self._snapshot()
        self.image.card_blocked = True
        self._commit(before)
        return b""


def _valid_pin_bcd(data: bytes) -> bool:
    try:
        crypto.bcd_to_pin(data)
    except crypto.CryptoError:
        return False
    return bool(data)
