"""Logging for the backend: the project's redacting chain (:mod:`apdu_specs.redaction`).

No full ID number, name or password reaches a log line; the request path logs ids and outcomes,
never payloads.
"""

from __future__ import annotations

from apdu_specs.redaction import configure, redact, redact_text

__all__ = ["configure", "redact", "redact_text"]
