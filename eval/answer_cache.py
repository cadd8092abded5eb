"""Finished eval answers, kept as they come, so a re-run after a crash resumes where it
stopped instead of asking the model again.

An answer is keyed by everything that decides it: the exact messages (question, retrieved
chunks, template), the token budget and sampling, the generator, the adapter (name and the
time it was made, so a retrained adapter of the same name is not mistaken for the old one),
the engine kind and dtype. Any change of settings gives new keys; nothing is ever reused
across them. The system and question id are stored beside each row for people to read.

SQLite in WAL mode, one commit per finished batch: a SIGKILL loses at most the batch that
was running.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from docent.engine import ChatRequest, Completion

SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    key TEXT PRIMARY KEY,
    system TEXT NOT NULL,
    qid TEXT NOT NULL,
    completion TEXT NOT NULL,
    created TEXT NOT NULL DEFAULT (datetime('now'))
)
"""


class AnswerCache:
    def __init__(self, path: Path, identity: Mapping[str, Any]) -> None:
        """``identity``: what every key shares (generator, engine kind, dtype, adapters)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.identity = json.dumps(dict(identity), sort_keys=True, default=str)
        self.db = sqlite3.connect(str(path), check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(SCHEMA)
        self.db.commit()
        self.hits = 0
        self.stored = 0

    def key(self, request: ChatRequest, adapter_identity: str | None) -> str:
        payload = json.dumps(
            [self.identity, adapter_identity, request.messages, request.max_tokens,
             request.temperature, request.top_p, request.stop, request.seed,
             request.quote_sources],
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def get(self, key: str) -> Completion | None:
        row = self.db.execute("SELECT completion FROM answers WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        self.hits += 1
        return Completion(**json.loads(row[0]))

    def put_many(self, rows: list[tuple[str, str, str, Completion]]) -> None:
        """(key, system, qid, completion) rows, committed together."""
        self.db.executemany(
            "INSERT OR REPLACE INTO answers (key, system, qid, completion) VALUES (?, ?, ?, ?)",
            [(k, s, q, json.dumps(c.__dict__)) for k, s, q, c in rows],
        )
        self.db.commit()
        self.stored += len(rows)

    def close(self) -> None:
        self.db.close()
