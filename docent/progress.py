"""The progress callback every long stage takes: ``progress(stage, done, total)``.

Stages report through it and stay free of any UI; the CLI draws rich bars from it."""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str, int, int], None]


def no_progress(stage: str, done: int, total: int) -> None:
    """The default: report nothing."""
