"""The improvement loop's rounds on disk: what each round was asked, what each stage did and
made, and why its adapter was promoted or not.

Layout under ``<workspace>/loop``::

    LOCK                 held (flock) while a round runs: one loop at a time, across processes;
                         the kernel drops it when its process dies, SIGKILL included
    r0001/round.json     one round: request, stages, lineage, scores, decision
    r0001/pairs.jsonl    its preference pairs, r0001/feedback.jsonl its exported corrections

A round record is rewritten (atomically) at every stage boundary, so a round cut off at any
point says where it stopped, and the next run of the same request resumes it there.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from docent.errors import ConfigError, DocentError

LOCK = "LOCK"
ROUND_FILE = "round.json"
_ROUND = re.compile(r"^r(\d{4,})$")
STAGE_STATES = ("pending", "running", "done", "skipped", "failed")


class LoopBusyError(DocentError):
    """A loop round is already running (HTTP 409)."""


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class StageRecord:
    state: str = "pending"
    started: str | None = None
    finished: str | None = None
    seconds: float = 0.0
    attempts: int = 0  # how many times the stage started: above 1 after a crash mid-stage
    note: str | None = None  # why it was skipped, or what it reused
    result: dict[str, Any] = field(default_factory=dict)


@dataclass
class RoundRecord:
    id: str
    request: dict[str, Any]
    started: str = field(default_factory=now)
    finished: str | None = None
    state: str = "running"  # running, succeeded, failed, unchanged, abandoned
    stages: dict[str, StageRecord] = field(default_factory=dict)
    # index version -> RAFT set and its hash -> adapters -> scores -> decision
    lineage: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, Any] = field(default_factory=dict)
    decision: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    pid: int | None = None

    @property
    def number(self) -> int:
        return int(self.id[1:])

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RoundRecord:
        stages = {k: StageRecord(**v) for k, v in (data.get("stages") or {}).items()}
        return cls(**{**data, "stages": stages})


class RoundStore:
    """The rounds of one workspace."""

    def __init__(self, loop_dir: Path) -> None:
        self.dir = loop_dir

    def folder(self, round_id: str) -> Path:
        return self.dir / round_id

    def rounds(self) -> list[RoundRecord]:
        """Every round, oldest first. A record that cannot be read is skipped, not fatal: the
        history is for reading, and one bad file must not hide the others."""
        if not self.dir.exists():
            return []
        found = []
        for folder in sorted(self.dir.iterdir()):
            path = folder / ROUND_FILE
            if _ROUND.match(folder.name) and path.exists():
                try:
                    found.append(RoundRecord.from_dict(json.loads(path.read_text())))
                except (ValueError, TypeError):
                    continue
        return found

    def get(self, round_id: str) -> RoundRecord:
        path = self.folder(round_id) / ROUND_FILE
        if not _ROUND.match(round_id) or not path.exists():
            known = ", ".join(r.id for r in self.rounds()) or "none yet"
            raise ConfigError(f"no loop round {round_id!r} (rounds: {known})")
        return RoundRecord.from_dict(json.loads(path.read_text()))

    def latest(self) -> RoundRecord | None:
        rounds = self.rounds()
        return rounds[-1] if rounds else None

    def new(self, request: dict[str, Any]) -> RoundRecord:
        latest = self.latest()
        number = latest.number + 1 if latest else 1
        record = RoundRecord(id=f"r{number:04d}", request=request, pid=os.getpid())
        self.save(record)
        return record

    def save(self, record: RoundRecord) -> None:
        folder = self.folder(record.id)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f"{ROUND_FILE}.tmp"
        tmp.write_text(json.dumps(record.as_dict(), indent=2, default=str))
        os.replace(tmp, folder / ROUND_FILE)

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the loop lock, or raise ``LoopBusyError`` saying which round holds it."""
        self.dir.mkdir(parents=True, exist_ok=True)
        handle: TextIO = (self.dir / LOCK).open("a+")
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise LoopBusyError(self.busy_message()) from None
            handle.seek(0)
            handle.truncate()
            handle.write(str(os.getpid()))
            handle.flush()
            yield
        finally:
            handle.close()  # closing drops the lock

    def busy(self) -> bool:
        """Whether some process holds the loop lock now."""
        path = self.dir / LOCK
        if not path.exists():
            return False
        with path.open("a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
        return False

    def busy_message(self) -> str:
        running = next((r for r in reversed(self.rounds()) if r.state == "running"), None)
        where = ""
        if running is not None:
            stage = next((n for n, s in running.stages.items() if s.state == "running"), None)
            where = f" (round {running.id}, started {running.started}" + (
                f", now in stage {stage})" if stage else ")"
            )
        return (
            f"a loop round is already running{where}: wait for it to finish "
            "(`docent loop history`, or GET /v1/jobs/{id}) before starting another"
        )
