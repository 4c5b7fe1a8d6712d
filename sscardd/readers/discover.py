"""Finding the card reader and the PSAM when the configuration does not name them.

The card reader: the first PC/SC reader holding a social security card (a mute or garbage card
elsewhere does not stop the search). The PSAM: every other PC/SC reader is asked for the PSAM
application. Both are shared by the operator CLI and the daemon.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection

import structlog

from sscardd.errors import SSCardError
from sscardd.psam import PsamClient
from sscardd.readers import open_reader
from sscardd.readers.base import Reader
from sscardd.session import CardSession

log = structlog.get_logger("sscardd.readers")


def pcsc_reader_names() -> list[str]:
    from sscardd.readers.pcsc import list_readers

    return list_readers()


async def find_card_reader(name: str | None, *, exclude: Collection[str] = ()) -> Reader:
    """The reader called ``name``, or the first PC/SC reader (not in ``exclude``) holding a social
    security card; NO_CARD if none does."""
    if name:
        return open_reader(name)
    for candidate in await asyncio.to_thread(pcsc_reader_names):
        if candidate in exclude:
            continue
        reader = open_reader(candidate)
        try:
            if await reader.present() and (await CardSession(reader).status()).get("sscard"):
                return reader
        except SSCardError as exc:  # a mute or garbage card elsewhere must not stop the search
            log.info("skipping reader", reader=candidate, error=exc.code)
        await reader.close()
    raise SSCardError("NO_CARD", "no PC/SC reader holds a social security card")


async def find_psam(name: str | None, *, exclude: Collection[str] = ()) -> PsamClient | None:
    """A PSAM client for the reader ``name`` (its probe must succeed: NO_PSAM otherwise), or for the
    first other PC/SC reader whose card answers as a PSAM; ``None`` when there is none."""
    if name:
        reader = open_reader(name)
        client = PsamClient(reader)
        try:
            await asyncio.to_thread(client.probe)
        except BaseException:
            await reader.close()
            raise
        return client
    try:
        names = await asyncio.to_thread(pcsc_reader_names)
    except SSCardError:
        return None  # no pcscd: no PSAM to find
    for candidate in names:
        if candidate in exclude:
            continue
        reader = open_reader(candidate)
        client = PsamClient(reader)
        try:
            await asyncio.to_thread(client.probe)
            return client
        except SSCardError:
            await reader.close()
    return None

