"""The serial reader's frame codec: vectors, payload helpers, the streaming decoder's resync."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apdu_specs.serial_frame import (
    MAX_DATA,
    STX,
    VECTORS,
    BadFrame,
    CardEvent,
    Command,
    Frame,
    FrameDecoder,
    FrameError,
    KeypadStatus,
    Result,
    SlotStatus,
    crc16,
    decode_frame,
    describe,
    encode_frame,
    event_frame,
    keypad_reply,
    keypad_request,
    parse_event,
    parse_keypad_reply,
    parse_keypad_request,
    parse_reply,
    parse_status_reply,
    reply_frame,
)


def frames_of(items: list[Frame | BadFrame]) -> list[Frame]:
    return [i for i in items if isinstance(i, Frame)]


def test_crc_check_value() -> None:
    assert crc16(b"123456789") == 0x29B1  # CRC-16/CCITT-FALSE


@pytest.mark.parametrize(("hexframe", "frame", "meaning"), VECTORS, ids=[v[0][:14] for v in VECTORS])
def test_vectors(hexframe: str, frame: Frame, meaning: dict[str, object]) -> None:
    raw = bytes.fromhex(hexframe)
    assert decode_frame(raw) == frame
    assert frame.encode() == raw
    assert describe(frame) == meaning
    dec = FrameDecoder()
    got: list[Frame | BadFrame] = []
    for b in raw:  # byte by byte, as a slow line delivers it
        got += dec.feed(bytes((b,)))
    assert got == [frame] and dec.pending == 0


def test_all_vectors_in_one_stream() -> None:
    stream = b"".join(bytes.fromhex(h) for h, _, _ in VECTORS)
    assert FrameDecoder().feed(stream) == [f for _, f, _ in VECTORS]


def test_payload_helpers() -> None:
    assert parse_reply(decode_frame(reply_frame(7, Command.APDU, Result.OK, b"\x90\x00"))) == \
        (Result.OK, b"\x90\x00")
    assert keypad_request(30) == b"\x1e" and keypad_request(0.2) == b"\x01" and keypad_request(1e6) == b"\xff"
    assert keypad_request(29.1) == b"\x1e"
    assert parse_keypad_request(b"\x1e") == 30
    for bad in (b"", b"\x00", b"\x01\x02"):
        with pytest.raises(FrameError):
            parse_keypad_request(bad)
    assert parse_keypad_reply(keypad_reply(KeypadStatus.INITIAL_PIN, 0x9000)) == \
        (KeypadStatus.INITIAL_PIN, 0x9000)
    with pytest.raises(FrameError):
        parse_keypad_reply(b"\x99\x90\x00")
    assert parse_status_reply(b"\x01") is SlotStatus.PRESENT
    with pytest.raises(FrameError):
        parse_status_reply(b"\x07")
    ev = decode_frame(event_frame(CardEvent.INSERTED, b"\x3b\x6c"))
    assert ev.is_event and not ev.is_reply and parse_event(ev) == (CardEvent.INSERTED, b"\x3b\x6c")
    with pytest.raises(FrameError):
        parse_reply(Frame(1, Command.APDU | 0x80))
    with pytest.raises(FrameError):
        parse_reply(Frame(1, Command.APDU | 0x80, b"\x77"))


def test_encode_limits() -> None:
    assert len(encode_frame(1, Command.APDU, bytes(MAX_DATA))) == MAX_DATA + 8
    with pytest.raises(FrameError):
        encode_frame(1, Command.APDU, bytes(MAX_DATA + 1))
    with pytest.raises(FrameError):
        encode_frame(256, Command.APDU)


def test_decode_frame_refusals() -> None:
    good = encode_frame(3, Command.STATUS)
    for bad in (good[:-1], good + b"\x00", good[:-3] + b"\x00\x00\x03", good[:-1] + b"\x04",
                b"\x03" + good[1:], b""):
        with pytest.raises(FrameError):
            decode_frame(bad)


def test_bad_crc_is_reported_and_the_next_frame_found() -> None:
    good = encode_frame(5, Command.APDU, b"\x00\xa4\x04\x00")
    garbled = bytearray(good)
    garbled[6] ^= 0x40  # a data bit flipped on the line
    got = FrameDecoder().feed(bytes(garbled) + good)
    assert got[0] == BadFrame("checksum", 6, 5, Command.APDU) and got[0].well_framed
    assert frames_of(got) == [decode_frame(good)]


def test_missing_etx_is_a_terminator_error() -> None:
    good = encode_frame(5, Command.STATUS)
    got = FrameDecoder().feed(good[:-1] + b"\x00" + good)
    assert isinstance(got[0], BadFrame) and got[0].reason == "terminator" and not got[0].well_framed
    assert frames_of(got) == [decode_frame(good)]


def test_oversize_length_is_refused_at_once() -> None:
    # LEN 0x0108 = 264 > 263: rejected without waiting for 264 bytes.
    dec = FrameDecoder()
    got = dec.feed(b"\x02\x01\x08\x01\x20")
    assert got == [BadFrame("length", 264, 1, 0x20)]
    assert dec.pending == 0


def test_stray_stx_with_plausible_length_is_dropped_when_the_line_idles() -> None:
    good = encode_frame(9, Command.INFO)
    dec = FrameDecoder()
    assert dec.feed(b"\x02\x00\x40" + good) == []  # waits for 64 bytes that never come
    assert dec.flush() == [decode_frame(good)]
    assert dec.pending == 0


def test_frame_split_over_feeds() -> None:
    good = encode_frame(1, Command.APDU | 0x80, b"\x00" + bytes(range(200)) + b"\x90\x00")
    dec = FrameDecoder()
    assert dec.feed(good[:100]) == []
    assert dec.feed(good[100:]) == [decode_frame(good)]


# -- properties ---------------------------------------------------------------------------------

frames = st.builds(Frame, st.integers(0, 255), st.integers(0, 255), st.binary(max_size=MAX_DATA))


@given(frames)
def test_round_trip(frame: Frame) -> None:
    raw = frame.encode()
    assert decode_frame(raw) == frame
    assert FrameDecoder().feed(raw) == [frame]


@given(st.lists(st.binary(max_size=64), max_size=20))
@settings(max_examples=300)
def test_garbage_never_raises_nor_invents_frames(chunks: list[bytes]) -> None:
    stream = b"".join(chunks)
    dec = FrameDecoder()
    got: list[Frame | BadFrame] = []
    for c in chunks:
        got += dec.feed(c)
    got += dec.flush()
    for f in frames_of(got):  # a frame only if its exact bytes were in the garbage
        assert f.encode() in stream


@given(st.lists(st.tuples(st.binary(max_size=40), frames), max_size=6), st.binary(max_size=40))
@settings(max_examples=300)
def test_frames_survive_garbage_around_them(pairs: list[tuple[bytes, Frame]], tail: bytes) -> None:
    stream = b"".join(g + f.encode() for g, f in pairs) + tail
    dec = FrameDecoder()
    got = frames_of(dec.feed(stream) + dec.flush())
    # Every frame sent comes out, in order (garbage may add frames only by containing them).
    it = iter(got)
    assert all(any(g == f for g in it) for _, f in pairs)


@given(st.binary(max_size=MAX_DATA), st.integers(0, 2**31), st.integers(1, 255))
def test_a_corrupted_byte_never_passes(data: bytes, where: int, flip: int) -> None:
    raw = bytearray(encode_frame(1, Command.APDU, data))
    raw[where % len(raw)] ^= flip
    dec = FrameDecoder()
    got = frames_of(dec.feed(bytes(raw)) + dec.flush())
    # CRC-16 catches every error within one byte, so nothing decodes from the frame's start;
    # a frame can only come from inside the data (if the data held one).
    assert all(f.encode() in bytes(raw[1:]) for f in got)


def test_stx_only_garbage() -> None:
    dec = FrameDecoder()
    assert frames_of(dec.feed(bytes([STX]) * 1000)) == []
    assert dec.pending < 1000
    dec.flush()
    assert dec.pending == 0
