"""Tear-safe persistence of a card image.

A card's EEPROM write either happens or it does not; the emulator keeps that promise for its
image file: the new content is written to a temporary file beside it, flushed and synced, then
renamed over the old one (atomic on POSIX), and the directory is synced. A process killed at any
point leaves the old or the new image, never a mix.

``fault`` is a test hook called at each stage (``"tmp-partial"``, ``"tmp-synced"``,
``"replaced"``); tests make it kill the process to prove the claim. The environment variable
``SSCARD_EMU_CRASH_AT=<stage>[:<n>]`` does the same for a served emulator (``os._exit(70)`` at
the n-th time the stage is reached, default the first).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

STAGES = ("tmp-partial", "tmp-synced", "replaced")


class ImageError(Exception):
    """The image file cannot be read or is not a valid image."""


def _env_fault() -> Callable[[str], None] | None:
    spec = os.environ.get("SSCARD_EMU_CRASH_AT")
    if not spec:
        return None
    stage, _, count = spec.partition(":")
    if stage not in STAGES:
        raise ImageError(f"SSCARD_EMU_CRASH_AT: unknown stage {stage!r}; one of {STAGES}")
    remaining = [int(count or "1")]

    def hook(at: str) -> None:
        if at == stage:
            remaining[0] -= 1
            if remaining[0] <= 0:
                os._exit(70)

    return hook


class TearSafeStore:
    """Load and atomically save a JSON document at ``path``."""

    def __init__(self, path: str | Path, fault: Callable[[str], None] | None = None,
                 sync: bool = True):
        self.path = Path(path)
        self.fault = fault if fault is not None else _env_fault()
        self.sync = sync

    def load(self) -> dict[str, Any]:
        try:
            raw = self.path.read_bytes()
        except OSError as exc:
            raise ImageError(f"{self.path}: cannot read image: {exc.strerror}") from exc
        try:
            doc = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ImageError(f"{self.path}: not a valid image (JSON: {exc})") from exc
        if not isinstance(doc, dict):
            raise ImageError(f"{self.path}: not a valid image (top level is not an object)")
        return doc

    def save(self, doc: dict[str, Any]) -> None:
        data = json.dumps(doc, indent=1, sort_keys=True, ensure_ascii=False).encode() + b"\n"
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            half = len(data) // 2
            os.write(fd, data[:half])
            if self.fault:
                self.fault("tmp-partial")
            view = memoryview(data)[half:]
            while view:
                n = os.write(fd, view)
                view = view[n:]
            if self.sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        if self.fault:
            self.fault("tmp-synced")
        os.replace(tmp, self.path)
        if self.sync:
            dfd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        if self.fault:
            self.fault("replaced")
