"""Command-line times: ISO 8601, UTC unless a zone is given, refused with the flag named."""

from __future__ import annotations

import pytest

from pipeline.tools.timespec import TimeError, parse_time
from schemas.errors import ConfigError, ExitCode, exit_code


def test_times_are_iso_8601_and_default_to_utc() -> None:
    assert parse_time("2026-11-20T00:00Z", "--from") == 1_795_132_800_000
    assert parse_time("2026-11-20", "--from") == 1_795_132_800_000
    assert parse_time("2026-11-20T01:00+01:00", "--from") == 1_795_132_800_000


def test_a_time_that_is_not_iso_8601_is_bad_input_naming_the_flag() -> None:
    with pytest.raises(TimeError, match="--to: 'yesterday' is not an ISO 8601 time") as bad:
        parse_time("yesterday", "--to")
    assert isinstance(bad.value, ConfigError)
    assert exit_code(bad.value) == ExitCode.BAD_INPUT
