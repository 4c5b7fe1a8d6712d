"""The algorithms of card-spec §4 in :mod:`apdu_specs.crypto`.

Known-answer vectors come from public standards; everything else is recomputed here from the
``cryptography`` primitives following card-spec §4 and Appendix B, independently of the module.
"""

from __future__ import annotations

import contextlib

import pytest
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given
from hypothesis import strategies as st

from apdu_specs import crypto
from apdu_specs.crypto import Algorithm, CryptoError

DES3, SM4 = Algorithm.DES3, Algorithm.SM4

# --- reference implementations (test-local) ------------------------------------------------------


def _raw(alg: Algorithm, key: bytes, data: bytes, *, decrypt: bool = False, iv: bytes | None = None) -> bytes:
    if alg is DES3:
        cipher_alg = TripleDES(key * 3 if len(key) == 8 else key + key[:8])  # K1‖K2‖K1
    else:
        cipher_alg = algorithms.SM4(key)
    mode = modes.ECB() if iv is None else modes.CBC(iv)
    c = Cipher(cipher_alg, mode)
    ctx = c.decryptor() if decrypt else c.encryptor()
    return ctx.update(data) + ctx.finalize()


def _single_des(key8: bytes, block: bytes, *, decrypt: bool = False) -> bytes:
    assert len(key8) == 8
    return _raw(DES3, key8, block, decrypt=decrypt)


def _pad_m(data: bytes, bs: int) -> bytes:
    out = data + b"\x80"
    while len(out) % bs:
        out += b"\x00"
    return out


def _ref_mac(alg: Algorithm, sk: bytes, msg: bytes, iv: bytes | None = None) -> bytes:
    bs = 8 if alg is DES3 else 16
    last = _raw(alg, sk, _pad_m(msg, bs), iv=iv or bytes(bs))[-bs:]
    if alg is DES3:
        return last[:4]
    w = [last[i : i + 4] for i in range(0, 16, 4)]
    return bytes(a ^ b ^ c ^ d for a, b, c, d in zip(*w, strict=True))


def _ref_encrypt(alg: Algorithm, sk: bytes, plain: bytes) -> bytes:
    bs = 8 if alg is DES3 else 16
    block = bytes([len(plain)]) + plain
    if len(block) % bs:
        block = _pad_m(block, bs)
    return _raw(alg, sk, block)


def _not(b: bytes) -> bytes:
    return bytes(~x & 0xFF for x in b)


def _ref_session(alg: Algorithm, key: bytes, rnd: bytes) -> bytes:
    bs = 8 if alg is DES3 else 16
    return _raw(alg, key, rnd + bytes(bs - len(rnd)))


def _ref_auth(alg: Algorithm, key: bytes, rnd: bytes, plain8: bytes) -> bytes:
    sk = _ref_session(alg, key, rnd)
    if alg is DES3:
        return _single_des(sk, plain8)
    out = _raw(SM4, sk, plain8 + bytes(8))
    return bytes(a ^ b for a, b in zip(out[:8], out[8:], strict=True))


def _ref_diversify(alg: Algorithm, key: bytes, f8: bytes) -> bytes:
    if alg is DES3:
        return _raw(DES3, key, f8) + _raw(DES3, key, _not(f8))
    return _raw(SM4, key, f8 + _not(f8))


K16 = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
K16B = bytes.fromhex("00112233445566778899AABBCCDDEEFF")

# --- known-answer tests --------------------------------------------------------------------------


def test_sm4_self_test() -> None:
    # card-spec §4.1
    assert crypto.ecb_encrypt(SM4, bytes(16), bytes(16)) == bytes.fromhex("9F1F7BFF6F5511384D9430531E538FD3")


def test_sm4_gbt32907_example() -> None:
    # GB/T 32907-2016 appendix A, example 1: key = plaintext
    ct = bytes.fromhex("681EDF34D206965E86B3E94F536E4246")
    assert crypto.ecb_encrypt(SM4, K16, K16) == ct
    assert crypto.ecb_decrypt(SM4, K16, ct) == K16


@pytest.mark.parametrize(
    ("key", "plain", "cipher"),
    [
        # the classic single-DES worked example ("Now is t")
        ("0123456789ABCDEF", "4E6F772069732074", "3FA40E8A984D4815"),
        ("133457799BBCDFF1", "0123456789ABCDEF", "85E813540F0AB405"),
        # NIST SP 800-20, variable-plaintext known-answer test (key 01..01)
        ("0101010101010101", "8000000000000000", "95F8A5E5DD31D900"),
        ("0101010101010101", "4000000000000000", "DD7F121CA5015619"),
        ("0101010101010101", "2000000000000000", "2E8653104F3834EA"),
        # NIST SP 800-20, variable-key known-answer test (plaintext 00..00)
        ("8001010101010101", "0000000000000000", "95A8D72813DAA94D"),
        ("4001010101010101", "0000000000000000", "0EEC1487DD8C26D5"),
    ],
)
def test_des_known_answers(key: str, plain: str, cipher: str) -> None:
    k, p, c = bytes.fromhex(key), bytes.fromhex(plain), bytes.fromhex(cipher)
    assert crypto.ecb_encrypt(DES3, k, p) == c  # 8-byte key: single DES
    assert crypto.ecb_decrypt(DES3, k, c) == p
    # a 16-byte key K‖K is two-key 3DES with K1 = K2, which degenerates to single DES
    assert crypto.ecb_encrypt(DES3, k + k, p) == c
    assert crypto.ecb_decrypt(DES3, k + k, c) == p


def test_two_key_3des_is_ede() -> None:
    plain = bytes.fromhex("0123456789ABCDEF")
    k1, k2 = K16[:8], K16[8:]
    ede = _single_des(k1, _single_des(k2, _single_des(k1, plain), decrypt=True))
    assert crypto.ecb_encrypt(DES3, K16, plain) == ede
    # the same value from pycryptodome's independent DES3 implementation
    assert ede == bytes.fromhex("1A4D672DCA6CB335")
    assert crypto.ecb_decrypt(DES3, K16, ede) == plain


def test_algorithm_properties() -> None:
    assert (DES3.block_size, SM4.block_size, Algorithm.SSF33.block_size) == (8, 16, 16)
    assert (DES3.label, SM4.label, Algorithm.SSF33.label) == ("3DES", "SM4", "SSF33")
    assert (int(DES3), int(Algorithm.SSF33), int(SM4)) == (1, 2, 3)  # FCI 9F0C/86 ids


@pytest.mark.parametrize(
    ("alg", "key", "data"),
    [
        (Algorithm.SSF33, bytes(16), bytes(16)),  # unsupported
        (DES3, bytes(24), bytes(8)),  # three-key 3DES is not used
        (DES3, bytes(7), bytes(8)),
        (SM4, bytes(8), bytes(16)),
        (DES3, bytes(16), bytes(7)),  # not block aligned
        (SM4, bytes(16), bytes(8)),
    ],
)
def test_block_cipher_errors(alg: Algorithm, key: bytes, data: bytes) -> None:
    with pytest.raises(CryptoError):
        crypto.ecb_encrypt(alg, key, data)
    with pytest.raises(CryptoError):
        crypto.ecb_decrypt(alg, key, data)


def test_cbc_encrypt() -> None:
    data = bytes(range(32))
    assert crypto.cbc_encrypt(SM4, K16, data) == _raw(SM4, K16, data, iv=bytes(16))
    iv = bytes(range(8))
    assert crypto.cbc_encrypt(DES3, K16, data, iv) == _raw(DES3, K16, data, iv=iv)
    with pytest.raises(CryptoError):
        crypto.cbc_encrypt(DES3, K16, data, bytes(16))
    with pytest.raises(CryptoError):
        crypto.cbc_encrypt(DES3, K16, data[:7])


# --- padding (Appendix B padM / padE) ------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "bs", "pad_m", "pad_e"),
    [
        ("", 8, "8000000000000000", ""),
        ("01", 8, "0180000000000000", "0180000000000000"),
        ("01020304050607", 8, "0102030405060780", "0102030405060780"),
        ("0102030405060708", 8, "01020304050607088000000000000000", "0102030405060708"),
        ("010203040506070809", 8, "01020304050607080980000000000000", "01020304050607080980000000000000"),
        ("00" * 16, 16, "00" * 16 + "80" + "00" * 15, "00" * 16),
        ("00" * 15, 16, "00" * 15 + "80", "00" * 15 + "80"),
    ],
)
def test_padding(data: str, bs: int, pad_m: str, pad_e: str) -> None:
    raw = bytes.fromhex(data)
    assert crypto.pad_mac(raw, bs) == bytes.fromhex(pad_m)
    assert crypto.pad_enc(raw, bs) == bytes.fromhex(pad_e)


# --- MAC (§4.4) ------------------------------------------------------------------------------

MSG_LENGTHS = [0, 1, 4, 7, 8, 9, 15, 16, 17, 24, 31, 32, 33, 100]


@pytest.mark.parametrize("n", MSG_LENGTHS)
@pytest.mark.parametrize(("alg", "sk"), [(DES3, K16[:8]), (DES3, K16), (SM4, K16)],
                         ids=["des-8", "3des-16", "sm4"])
def test_mac_matches_reference(alg: Algorithm, sk: bytes, n: int) -> None:
    msg = bytes((i * 37 + 5) & 0xFF for i in range(n))
    m = crypto.mac(alg, sk, msg)
    assert len(m) == 4
    assert m == _ref_mac(alg, sk, msg)


def test_mac_with_iv() -> None:
    msg = bytes.fromhex("04DC01EC0C") + bytes(8)
    iv = bytes.fromhex("1122334400000000")  # PSAM key loading style: challenge ‖ 00000000
    assert crypto.mac(DES3, K16[:8], msg, iv) == _ref_mac(DES3, K16[:8], msg, iv)
    assert crypto.mac(DES3, K16[:8], msg, iv) != crypto.mac(DES3, K16[:8], msg)


def test_mac_of_an_aligned_message_adds_a_block() -> None:
    # padM appends a full 80 00.. block to an aligned message, so the 8-byte message's MAC is
    # that of the message plus one block, not the CBC of the message alone
    sk = K16[:8]
    msg = bytes(range(8))
    assert crypto.mac(DES3, sk, msg) == _raw(DES3, sk, msg + b"\x80" + bytes(7), iv=bytes(8))[8:12]
    assert crypto.mac(DES3, sk, msg) != _raw(DES3, sk, msg, iv=bytes(8))[:4]


# --- encryption (§4.4) -----------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 3, 6, 7, 8, 14, 15, 16, 40, 255])
@pytest.mark.parametrize(("alg", "sk"), [(DES3, K16[:8]), (DES3, K16), (SM4, K16)],
                         ids=["des-8", "3des-16", "sm4"])
def test_encrypt_matches_reference_and_round_trips(alg: Algorithm, sk: bytes, n: int) -> None:
    plain = bytes((i * 11) & 0xFF for i in range(n))
    ct = crypto.encrypt(alg, sk, plain)
    assert ct == _ref_encrypt(alg, sk, plain)
    assert len(ct) % alg.block_size == 0
    assert crypto.decrypt(alg, sk, ct) == plain


def test_pin_reload_block_lengths() -> None:
    # card-spec §3.1: reload Lc 0C (DES: 8 enc + 4 MAC) or 14 (16-byte alg: 16 enc + 4 MAC)
    block = crypto.reload_pin_block("123456")
    assert len(crypto.encrypt(DES3, K16[:8], block)) == 8
    assert len(crypto.encrypt(SM4, K16, block)) == 16


def test_encrypt_too_long() -> None:
    with pytest.raises(CryptoError):
        crypto.encrypt(SM4, K16, bytes(256))


@pytest.mark.parametrize(("alg", "sk"), [(DES3, K16[:8]), (SM4, K16)], ids=["des", "sm4"])
def test_decrypt_rejects_bad_input(alg: Algorithm, sk: bytes) -> None:
    bs = alg.block_size

    def enc_raw(block: bytes) -> bytes:
        return _raw(alg, sk, block)

    bad = [
        b"",  # empty
        bytes(bs - 1),  # not a block multiple
        enc_raw(bytes([bs]) + bytes(bs - 1)),  # LD beyond the data
        enc_raw(bytes([0xFF]) + bytes(bs - 1)),
        enc_raw(bytes([2]) + b"ab" + b"\x81" + bytes(bs - 4)),  # padding must start with 80
        enc_raw(bytes([2]) + b"ab" + b"\x00" * (bs - 3)),  # zero fill without 80
        enc_raw(bytes([2]) + b"ab" + b"\x80\x01" + bytes(bs - 5)),  # non-zero after 80
    ]
    for ct in bad:
        with pytest.raises(CryptoError):
            crypto.decrypt(alg, sk, ct)


# --- session keys and authentication (§4.2, Appendix B) -------------------------------------


@pytest.mark.parametrize(("alg", "rnd_len"), [(DES3, 4), (DES3, 8), (SM4, 4), (SM4, 8), (SM4, 16)])
def test_session_key(alg: Algorithm, rnd_len: int) -> None:
    rnd = bytes(range(0xA0, 0xA0 + rnd_len))
    sk = crypto.session_key(alg, K16, rnd)
    assert len(sk) == alg.block_size  # DES: an 8-byte single-DES key
    assert sk == _ref_session(alg, K16, rnd)


@pytest.mark.parametrize(("alg", "rnd_len"), [(DES3, 3), (DES3, 9), (DES3, 16), (SM4, 3), (SM4, 17)])
def test_session_key_bad_input(alg: Algorithm, rnd_len: int) -> None:
    with pytest.raises(CryptoError):
        crypto.session_key(alg, K16, bytes(rnd_len))


@pytest.mark.parametrize("alg", [DES3, SM4])
def test_auth_data(alg: Algorithm) -> None:
    rnd, plain = bytes.fromhex("1122334455667788"), bytes.fromhex("A1A2A3A4A5A6A7A8")
    a = crypto.auth_data(alg, K16, rnd, plain)
    assert len(a) == 8
    assert a == _ref_auth(alg, K16, rnd, plain)
    sk = crypto.session_key(alg, K16, rnd)
    assert crypto.auth_from_session(alg, sk, plain) == a
    # a 4-byte challenge is right-padded with 00
    assert crypto.auth_data(alg, K16, rnd[:4], plain) == _ref_auth(alg, K16, rnd[:4], plain)
    with pytest.raises(CryptoError):
        crypto.auth_data(alg, K16, rnd, plain[:7])
    with pytest.raises(CryptoError):
        crypto.auth_from_session(alg, sk, plain + b"\x00")


# --- diversification (§4.3, Appendix B) ------------------------------------------------------

# ATR historical bytes of card-spec §5.1's example: 00814A44468660 3702 12345678
HIST = bytes.fromhex("00814A44468660370212345678")


def test_factors() -> None:
    assert crypto.province_factor("370200") == bytes.fromhex("3337303030307368")  # Shandong
    assert crypto.city_factor("370200") == bytes.fromhex("3337303230307378")  # Qingdao
    assert crypto.city_factor("370202") == bytes.fromhex("3337303230327378")
    # Zhejiang (33…): ASCII of the first 4 digits + 30 30 73 78
    assert crypto.city_factor("330106") == bytes.fromhex("3333303130307378")
    assert crypto.province_factor("330106") == bytes.fromhex("3333303030307368")
    # level 3: historical bytes #6..#13
    assert crypto.card_factor(HIST) == bytes.fromhex("8660370212345678")
    assert crypto.diversification_factors("370200", HIST) == [
        bytes.fromhex("3337303030307368"),
        bytes.fromhex("3337303230307378"),
        bytes.fromhex("8660370212345678"),
    ]


@pytest.mark.parametrize("region", ["3702", "3702000", "37020a", "３７０２００", ""])
def test_factor_bad_region(region: str) -> None:
    with pytest.raises(CryptoError):
        crypto.province_factor(region)
    with pytest.raises(CryptoError):
        crypto.city_factor(region)


def test_card_factor_needs_13_bytes() -> None:
    with pytest.raises(CryptoError):
        crypto.card_factor(HIST[:12])
    with pytest.raises(CryptoError):
        crypto.card_factor(HIST + b"\x00")


@pytest.mark.parametrize("alg", [DES3, SM4])
def test_diversify_matches_appendix_b(alg: Algorithm) -> None:
    f = bytes.fromhex("3337303230307378")
    sub = crypto.diversify(alg, K16, f)
    assert len(sub) == 16
    assert sub == _ref_diversify(alg, K16, f)
    with pytest.raises(CryptoError):
        crypto.diversify(alg, K16, f[:7])


@pytest.mark.parametrize("alg", [DES3, SM4])
def test_derive_chain(alg: Algorithm) -> None:
    factors = crypto.diversification_factors("370200", HIST)
    expected = K16B
    for f in factors:
        expected = _ref_diversify(alg, expected, f)
    assert crypto.derive(alg, K16B, factors) == expected
    assert crypto.derive(alg, K16B, []) == K16B
    # the PSAM holding a city key derives the same card key from the last factor alone
    city = crypto.derive(alg, K16B, factors[:2])
    assert crypto.derive(alg, city, factors[2:]) == expected


# --- PIN encodings ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pin", "hex_"), [("123456", "123456"), ("12345", "12345F"), ("888888", "888888"), ("0000", "0000"),
                      ("1234567890123456", "1234567890123456")]
)
def test_pin_bcd(pin: str, hex_: str) -> None:
    assert crypto.pin_to_bcd(pin) == bytes.fromhex(hex_)
    assert crypto.bcd_to_pin(bytes.fromhex(hex_)) == pin
    assert crypto.reload_pin_block(pin) == bytes.fromhex(hex_)


@pytest.mark.parametrize("pin", ["", "12a4", "12 34", "１２３４", "-123"])
def test_pin_to_bcd_rejects_non_digits(pin: str) -> None:
    with pytest.raises(CryptoError):
        crypto.pin_to_bcd(pin)


@pytest.mark.parametrize("hex_", ["", "F1", "12F4", "1AFF", "FF", "123FFF", "ABCD"])
def test_bcd_to_pin_rejects(hex_: str) -> None:
    with pytest.raises(CryptoError):
        crypto.bcd_to_pin(bytes.fromhex(hex_))


@given(st.text(alphabet="0123456789", min_size=1, max_size=32))
def test_pin_bcd_round_trip(pin: str) -> None:
    bcd = crypto.pin_to_bcd(pin)
    assert len(bcd) == (len(pin) + 1) // 2
    assert crypto.bcd_to_pin(bcd) == pin


# --- ISO 9564-1 format 4 PIN block -----------------------------------------------------------

AES_KEY = bytes.fromhex("000102030405060708090A0B0C0D0E0F")
PAN = "37020219900101123"  # the first 17 digits of the SSN
RND = bytes.fromhex("0123456789ABCDEF")


def _aes_ecb(key: bytes, block: bytes, *, decrypt: bool = False) -> bytes:
    c = Cipher(algorithms.AES(key), modes.ECB())
    ctx = c.decryptor() if decrypt else c.encryptor()
    return ctx.update(block) + ctx.finalize()


def _pan_field(pan: str) -> bytes:
    # ISO 9564-1 format 4 plain-text PAN field: M = len - 12, the PAN, 0 fill to 32 nibbles
    return bytes.fromhex(f"{len(pan) - 12:X}" + pan + "0" * (31 - len(pan)))


@pytest.mark.parametrize("pin", ["1234", "123456", "888888", "123456789012"])
@pytest.mark.parametrize("key_len", [16, 24, 32])
def test_format4_structure(pin: str, key_len: int) -> None:
    key = bytes(range(key_len))
    block = crypto.iso9564_format4_encipher(key, pin, PAN, RND)
    assert len(block) == 16
    # undo the two AES stages by hand
    inter = bytes(a ^ b for a, b in zip(_aes_ecb(key, block, decrypt=True), _pan_field(PAN), strict=True))
    pin_field = _aes_ecb(key, inter, decrypt=True)
    assert pin_field[:8].hex().upper() == ("4" + f"{len(pin):X}" + pin).ljust(16, "A")
    assert pin_field[8:] == RND
    assert crypto.iso9564_format4_decipher(key, block, PAN) == pin


def test_format4_is_randomised() -> None:
    a = crypto.iso9564_format4_encipher(AES_KEY, "123456", PAN)
    b = crypto.iso9564_format4_encipher(AES_KEY, "123456", PAN)
    assert a != b
    assert crypto.iso9564_format4_decipher(AES_KEY, a, PAN) == "123456"
    assert crypto.iso9564_format4_decipher(AES_KEY, b, PAN) == "123456"


@pytest.mark.parametrize("pan", ["370202199001", "3702021990010112", "3702021990010112370"])
def test_format4_pan_lengths(pan: str) -> None:
    block = crypto.iso9564_format4_encipher(AES_KEY, "4321", pan, RND)
    assert crypto.iso9564_format4_decipher(AES_KEY, block, pan) == "4321"


def test_format4_wrong_pan_or_key() -> None:
    block = crypto.iso9564_format4_encipher(AES_KEY, "123456", PAN, RND)
    for pan in ("37020219900101124", "370202199001011", "47020219900101123"):
        with contextlib.suppress(CryptoError):
            assert crypto.iso9564_format4_decipher(AES_KEY, block, pan) != "123456"
    for key in (bytes(16), AES_KEY[::-1], AES_KEY + bytes(8)):
        with contextlib.suppress(CryptoError):
            assert crypto.iso9564_format4_decipher(key, block, PAN) != "123456"


@given(st.binary(min_size=16, max_size=16), st.binary(min_size=16, max_size=16),
       st.text(alphabet="0123456789", min_size=12, max_size=19))
def test_format4_decipher_garbage(key: bytes, block: bytes, pan: str) -> None:
    try:
        pin = crypto.iso9564_format4_decipher(key, block, pan)
    except CryptoError:
        return
    assert pin.isdigit() and 4 <= len(pin) <= 12


@pytest.mark.parametrize(
    ("key", "pin", "pan", "rnd"),
    [
        (AES_KEY, "123", PAN, RND),  # PIN too short
        (AES_KEY, "1234567890123", PAN, RND),  # too long
        (AES_KEY, "12a4", PAN, RND),
        (AES_KEY, "1234", "37020219900", RND),  # 11 digits
        (AES_KEY, "1234", "37020219900101123700", RND),  # 20 digits
        (AES_KEY, "1234", "3702021990010112X", RND),
        (AES_KEY[:15], "1234", PAN, RND),
        (AES_KEY, "1234", PAN, RND[:7]),
        (bytes(8), "1234", PAN, RND),
    ],
)
def test_format4_encipher_bad_input(key: bytes, pin: str, pan: str, rnd: bytes) -> None:
    with pytest.raises(CryptoError):
        crypto.iso9564_format4_encipher(key, pin, pan, rnd)


def test_format4_decipher_bad_input() -> None:
    block = crypto.iso9564_format4_encipher(AES_KEY, "1234", PAN, RND)
    with pytest.raises(CryptoError):
        crypto.iso9564_format4_decipher(AES_KEY, block[:15], PAN)
    with pytest.raises(CryptoError):
        crypto.iso9564_format4_decipher(AES_KEY, block, "1234")
    with pytest.raises(CryptoError):
        crypto.iso9564_format4_decipher(AES_KEY[:10], block, PAN)


def test_random_bytes() -> None:
    assert len(crypto.random_bytes(8)) == 8
    assert crypto.random_bytes(16) != crypto.random_bytes(16)


# --- properties ------------------------------------------------------------------------------

des_keys = st.one_of(st.binary(min_size=8, max_size=8), st.binary(min_size=16, max_size=16))
sm4_keys = st.binary(min_size=16, max_size=16)
alg_and_key = st.one_of(st.tuples(st.just(DES3), des_keys), st.tuples(st.just(SM4), sm4_keys))


@given(alg_and_key, st.binary(max_size=255))
def test_encrypt_decrypt_round_trip(ak: tuple[Algorithm, bytes], plain: bytes) -> None:
    alg, key = ak
    ct = crypto.encrypt(alg, key, plain)
    assert ct == _ref_encrypt(alg, key, plain)
    assert crypto.decrypt(alg, key, ct) == plain


@given(alg_and_key, st.binary(max_size=200))
def test_mac_deterministic_four_bytes(ak: tuple[Algorithm, bytes], msg: bytes) -> None:
    alg, key = ak
    m = crypto.mac(alg, key, msg)
    assert len(m) == 4
    assert crypto.mac(alg, key, msg) == m
    assert m == _ref_mac(alg, key, msg)


@given(alg_and_key, st.binary(max_size=64))
def test_decrypt_garbage_raises_only_crypto_error(ak: tuple[Algorithm, bytes], data: bytes) -> None:
    alg, key = ak
    try:
        plain = crypto.decrypt(alg, key, data)
    except CryptoError:
        return
    assert len(plain) < len(data)


@given(st.sampled_from([DES3, SM4]), sm4_keys, st.binary(min_size=8, max_size=8))
def test_diversify_property(alg: Algorithm, key: bytes, f: bytes) -> None:
    assert crypto.diversify(alg, key, f) == _ref_diversify(alg, key, f)
