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
from collections.abc import Callable, Mapping, Sequence
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

    def answers(
        self,
        generate: Callable[[list[ChatRequest]], list[Completion]],
        items: Sequence[tuple[str, ChatRequest]],
        adapter_identity: str | None,
        system: str,
        *,
        batch: int,
        fresh: bool = False,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[Completion]:
        """The completions of ``items`` ((qid, request) pairs): stored ones from here, the rest
        from ``generate`` in batches of ``batch``, each batch stored as it finishes (so a crash
        loses at most one). ``fresh`` asks ``generate`` for every item again."""
        keys = [self.key(r, adapter_identity) for _, r in items]
        found: list[Completion | None] = [None if fresh else self.get(k) for k in keys]
        todo = [i for i, c in enumerate(found) if c is None]
        done = len(items) - len(todo)
        if progress:
            progress(done, len(items))
        for start in range(0, len(todo), batch):
            rows = todo[start:start + batch]
            made = generate([items[i][1] for i in rows])
            self.put_many([(keys[i], system, items[i][0], c)
                           for i, c in zip(rows, made, strict=True)])
            for i, c in zip(rows, made, strict=True):
                found[i] = c
            done += len(rows)
            if progress:
                progress(done, len(items))
        return [c for c in found if c is not None]

    def close(self) -> None:
        self.db.close()
