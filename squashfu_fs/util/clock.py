"""The injectable clock: ``SQUASHFU_NOW`` (ISO 8601 local time) overrides now.

Tests play a month of nights in seconds with it, and an administrator can
backfill. Every timestamp squashfu records is timezone-aware local time.
"""

from __future__ import annotations

import os
from datetime import datetime

from squashfu_fs.errors import UsageError

ENV_VAR = "SQUASHFU_NOW"


def now() -> datetime:
    """The current local time, or ``SQUASHFU_NOW`` when it is set."""
    override = os.environ.get(ENV_VAR)
    if override:
        return parse_local(override, what=ENV_VAR)
    return datetime.now().astimezone()


def parse_local(text: str, what: str = "time") -> datetime:
    """Parse ISO 8601; a naive value is taken as local time."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"{what}: {text!r} is not an ISO 8601 time (e.g. 2026-11-26T02:00)") from None
    if value.tzinfo is None:
        value = value.astimezone()
    return value
