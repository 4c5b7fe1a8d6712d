"""Readers: one async interface (:mod:`sscardd.readers.base`), three transports.

Reader names, as the CLI and the config take them:

* a PC/SC reader name, e.g. ``Virtual PCD 00 00`` (pyscard, through pcscd);
* ``serial:/dev/ttyUSB0`` — a serial reader with its own PIN keypad;
* ``emulated:IMAGE`` — a ``firmware_sim`` card or PSAM image, in-process (tests, demos, labs).
"""

from __future__ import annotations

from sscardd.errors import SSCardError
from sscardd.readers.base import Reader


def open_reader(name: str, **kw: object) -> Reader:
    """The reader for ``name`` (see the module docstring)."""
    if not isinstance(name, str) or not name.strip():
        raise SSCardError("BAD_PARAMETER", "empty reader name")
    if name.startswith("emulated:"):
        from sscardd.readers.emulated import EmulatedReader

        return EmulatedReader.from_image(name.removeprefix("emulated:"), **kw)
    if name.startswith("serial:"):
        from sscardd.readers.serial import SerialReader

        return SerialReader(name.removeprefix("serial:"), **kw)  # type: ignore[arg-type]
    from sscardd.readers.pcsc import PcscReader

    return PcscReader(name)
