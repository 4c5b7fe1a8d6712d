"""The daemon's fast MQTT 5 PUBLISH properties pack byte for byte as paho's own."""

from __future__ import annotations

import itertools

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from sscardd.mqtt import publish_properties


def slow(response_topic: str | None, correlation: bytes | None, expiry: int | None,
         content_type: str | None) -> Properties:
    p = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    if content_type is not None:
        p.ContentType = content_type
    if response_topic is not None:
        p.ResponseTopic = response_topic
    if correlation is not None:
        p.CorrelationData = correlation
    if expiry is not None:
        p.MessageExpiryInterval = expiry
    return p


@pytest.mark.parametrize(("rt", "corr", "exp", "ct"), list(itertools.product(
    (None, "sscard/v1/term/370212000001/settle/resp"), (None, b"sscardd/x/\x00\xff"),
    (None, 0, 10, 2**32 - 1), (None, "application/json"))))
def test_packs_like_paho(rt: str | None, corr: bytes | None, exp: int | None, ct: str | None) -> None:
    fast = publish_properties(response_topic=rt, correlation=corr, expiry=exp, content_type=ct)
    assert fast.pack() == slow(rt, corr, exp, ct).pack()
    assert publish_properties().pack() != publish_properties(correlation=b"a").pack()  # no sharing


def test_values_are_checked() -> None:
    with pytest.raises(ValueError):
        publish_properties(expiry=-1)
    with pytest.raises(TypeError):
        publish_properties(correlation="text")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        publish_properties(response_topic=b"t")  # type: ignore[arg-type]
