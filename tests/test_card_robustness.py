"""The card never crashes and never damages its image, whatever it is sent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from firmware_sim.cos import ResponseMode
from firmware_sim.image import CardImage
from firmware_sim.store import ImageError, TearSafeStore
from tests.emu import SELECT_DF04, SELECT_SSSE, new_card, ok, tx

KNOWN_INS = [0xA4, 0xB0, 0xB2, 0xD6, 0xDC, 0x20, 0x5E, 0x24, 0x84, 0x88, 0x82, 0xC0, 0x1E, 0x16]

apdus = st.one_of(
    st.binary(max_size=300),
    st.builds(
        lambda cla, ins, p1, p2, data, le: bytes((cla, ins, p1, p2))
        + (bytes((len(data),)) + data if data else b"")
        + (bytes((le,)) if le is not None else b""),
        st.sampled_from([0x00, 0x04, 0x80, 0x84, 0x0C, 0xFF]),
        st.sampled_from(KNOWN_INS),
        st.integers(0, 255),
        st.integers(0, 255),
        st.binary(max_size=40),
        st.none() | st.integers(0, 255),
    ),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seq=st.lists(apdus, max_size=12), gen=st.sampled_from([2, 3]),
       t0=st.booleans(), prelude=st.sampled_from(["", SELECT_SSSE, SELECT_DF04]))
def test_random_apdus_always_get_a_status_word(seq: list[bytes], gen: int, t0: bool, prelude: str) -> None:
    card = new_card(gen, ResponseMode.T0 if t0 else ResponseMode.DIRECT)
    if prelude:
        tx(card, prelude)
    for apdu in seq:
        out = card.execute(apdu)
        assert 2 <= len(out) <= 258
        sw1 = out[-2]
        assert sw1 in (0x90, 0x61, 0x6C, 0x63, 0x65, 0x67, 0x69, 0x6A, 0x6B, 0x6D, 0x6E, 0x6F, 0x93, 0x94)
    # a card that saw garbage still reads normally after a reset (unless garbage blocked it,
    # which would need a valid MAC)
    card.reset()
    assert tx(card, SELECT_SSSE).sw in (0x9000, 0x611E)


def test_pin_is_never_stored_in_clear(tmp_path: Path) -> None:
    card = new_card(3, pin="735194")
    path = tmp_path / "card.json"
    TearSafeStore(path).save(card.image.to_json())
    text = path.read_text()
    assert "735194" not in text
    assert bytes.fromhex("735194").hex() not in text.lower()


class FailingStore(TearSafeStore):
    def save(self, doc: dict[str, object]) -> None:
        raise OSError(28, "No space left on device")


def test_failed_write_answers_6581_and_changes_nothing(tmp_path: Path) -> None:
    card = new_card(3)
    path = tmp_path / "c.json"
    card.store = FailingStore(path)
    before = json.dumps(card.image.to_json(), sort_keys=True)
    ok(card, SELECT_SSSE)
    assert tx(card, "0020000003999999").sw == 0x6581  # counter write failed: nothing compared
    assert tx(card, "0020000003123456").sw == 0x9000  # a right PIN changes nothing persistent
    assert json.dumps(card.image.to_json(), sort_keys=True) == before
    assert tx(card, "00A4020002EF05").sw == 0x9000  # the card still knows where it is


def test_commit_happens_before_the_answer(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    card = new_card(2)
    store = TearSafeStore(path)
    store.save(card.image.to_json())
    card.store = store
    assert tx(card, "0020000003999999").sw == 0x63C2
    assert CardImage.from_json(store.load()).pin.tries == 2


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "not a valid image"),
        (b"{", "not a valid image"),
        (b"[]", "top level"),
        (b'{"format": "x"}', "not a card image"),
        (b'{"format": "sscard-emu-card/1"}', "malformed"),
        (b"\xff\xfe", "not a valid image"),
    ],
)
def test_bad_images_are_refused_clearly(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(ImageError, match=message):
        CardImage.from_json(TearSafeStore(path).load())


def test_missing_image(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="cannot read image"):
        TearSafeStore(tmp_path / "none.json").load()
