"""Times given on the command line: ISO 8601, as epoch milliseconds.

``replay --from/--to`` and ``dlq --since/--until`` take the same times, and they are
compared with record timestamps (epoch ms, UTC), so both parse them here, one way: a time
without a zone is UTC, whatever the machine's zone is.
"""

from __future__ import annotations

import datetime as dt

from schemas.errors import ConfigError

__all__ = ["TimeError", "parse_time"]


class TimeError(ConfigError):
    """A time on the command line is not ISO 8601 (exit 2: nothing was read or sent)."""


def parse_time(text: str, flag: str) -> int:
    """ISO 8601 (``2026-11-20T00:00Z``, ``2026-11-20``; no zone = UTC) to epoch ms."""
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise TimeError(f"{flag}: {text!r} is not an ISO 8601 time (2026-11-20T00:00Z)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return int(when.timestamp() * 1000)
