"""Whatever a card (or a PSAM) answers, the session ends with a named error, never a traceback."""

from __future__ import annotations

import asyncio
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sscardd.errors import SSCardError
from sscardd.psam import PsamClient
from sscardd.readers.emulated import EmulatedReader
from sscardd.session import CardSession, TxnRecord
from tests.rigs import GOOD, write_images


class ScriptedCard:
    """Answers each APDU with the next scripted response; then mirrors a real card."""

    def __init__(self, real: object, script: list[bytes], mix: list[bool]):
        self.real = real
        self.script = list(script)
        self.mix = list(mix)

    @property
    def atr(self) -> bytes:
        return self.real.atr  # type: ignore[attr-defined,no-any-return]

    def power_on(self) -> None:
        self.real.power_on()  # type: ignore[attr-defined]

    def power_off(self) -> None:
        self.real.power_off()  # type: ignore[attr-defined]

    def reset(self) -> None:
        self.real.reset()  # type: ignore[attr-defined]

    def execute(self, apdu: bytes) -> bytes:
        real_answer = self.real.execute(apdu)  # type: ignore[attr-defined]
        use_garbage = self.mix.pop(0) if self.mix else False
        if use_garbage and self.script:
            return self.script.pop(0)
        return real_answer  # type: ignore[no-any-return]


responses = st.one_of(
    st.binary(max_size=40),
    st.sampled_from([b"", b"\x90", b"\x61\x10", b"\x6c\x05", b"\x6c\x00", b"\x61\x00", b"\x90\x00",
                     b"\x63\xc1", b"\x69\x83", b"\x6a\x82", b"\x6f\x00"]),
    st.binary(min_size=1, max_size=30).map(lambda b: b + b"\x90\x00"),
)

OPS = ["read_basic", "status", "verify", "change", "read", "write", "record", "hsm", "hsm2"]


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(script=st.lists(responses, min_size=1, max_size=8),
       mix=st.lists(st.booleans(), min_size=1, max_size=40),
       op=st.sampled_from(OPS), garbage_psam=st.booleans(), gen=st.sampled_from([2, 3]),
       t0=st.booleans(), pkey=st.text(max_size=80))
def test_garbage_from_the_card_is_a_named_error(tmp_path_factory: object, script: list[bytes],
                                                mix: list[bool], op: str, garbage_psam: bool,
                                                gen: int, t0: bool, pkey: str) -> None:
    from firmware_sim.cos import ResponseMode

    tmp = Path(tmp_path_factory.mktemp("g"))  # type: ignore[attr-defined]
    cp, pp = write_images(tmp, gen)
    real_card = EmulatedReader.from_image(cp).card
    if t0:
        real_card.mode = ResponseMode.T0
    real_psam = EmulatedReader.from_image(pp).card
    card = ScriptedCard(real_card, [] if garbage_psam else script, mix)
    psam = ScriptedCard(real_psam, script if garbage_psam else [], mix)

    async def run() -> None:
        cr, pr = EmulatedReader(card), EmulatedReader(psam)  # type: ignore[arg-type]
        s = CardSession(cr, PsamClient(pr))
        try:
            if op == "read_basic":
                await s.read_basic()
            elif op == "status":
                await s.status()
            elif op == "verify":
                await s.verify_pin(GOOD)
            elif op == "change":
                await s.change_pin(GOOD, "135790", "135790")
            elif op == "read":
                await s.read("SSSEEF05|07|$DF04EF05|84|$DF04EF08|1|$", pin=GOOD)
            elif op == "write":
                await s.write("DF04EF05|84|$", "370203|$")
            elif op == "record":
                await s.record_settlement(TxnRecord(1, "370212000001", "20261125103000", 1, 2, 3))
            elif op == "hsm":
                await s.read_basic_hsm_step1()
            else:
                await s.read_basic_hsm_step1()
                await s.read_basic_hsm_step2(pkey)
        except SSCardError as exc:
            d = exc.to_dict()
            assert isinstance(d["compat_code"], int) and d["compat_code"] < 0
            assert d["message"] and d["message_zh"]
        finally:
            await cr.close()
            await pr.close()

    asyncio.run(run())
