"""What the API keeps on disk: answers (so feedback can point at one), chat sessions and
feedback. One SQLite file in WAL mode under ``<workspace>/serving``; safe across threads."""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from docent.errors import ConfigError
from docent.prompts import squash
from raft.text import sentence_with

SESSION_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")

SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    id TEXT PRIMARY KEY, created REAL, kind TEXT, session_id TEXT, question TEXT,
    answer TEXT, reasoning TEXT, declined INTEGER, citations TEXT, chunks TEXT,
    model TEXT, adapter TEXT
);
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY, mode TEXT, created REAL, updated REAL
);
CREATE TABLE IF NOT EXISTS messages (
    session_id TEXT, seq INTEGER, role TEXT, content TEXT, answer_id TEXT, created REAL,
    PRIMARY KEY (session_id, seq)
);
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY AUTOINCREMENT, answer_id TEXT, rating INTEGER, correction TEXT,
    comment TEXT, created REAL
);
CREATE INDEX IF NOT EXISTS feedback_answer ON feedback(answer_id);
"""
# Added after the first release: stores made before them get the columns on open. ``owner``
# is the fingerprint of the API key that made the row ("open" without keys).
OWNER_COLUMNS = ("answers", "sessions")


class NotFoundError(ConfigError):
    """The thing a request names does not exist (HTTP 404)."""


@dataclass
class StoredAnswer:
    id: str
    question: str
    answer: str
    citations: list[dict[str, Any]]
    chunks: list[dict[str, Any]]


class ServingStore:
    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "serving.db"
        self.lock = threading.Lock()
        self.conn = sqlite3.connect(str(self.path), check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.executescript(SCHEMA)
        for table in OWNER_COLUMNS:
            columns = {row[1] for row in self.conn.execute(f"PRAGMA table_info({table})")}
            if "owner" not in columns:
                self.conn.execute(f"ALTER TABLE {table} ADD COLUMN owner TEXT")
        self.conn.commit()

    # Answers -------------------------------------------------------------------------------
    def save_answer(
        self,
        *,
        kind: str,
        question: str,
        answer: str,
        reasoning: str,
        declined: bool,
        citations: list[dict[str, Any]],
        chunks: list[dict[str, Any]],
        model: str,
        adapter: str | None,
        session_id: str | None = None,
        owner: str | None = None,
    ) -> str:
        answer_id = f"ans_{uuid.uuid4().hex[:20]}"
        with self.lock, self.conn:
            self.conn.execute(
                "INSERT INTO answers (id, created, kind, session_id, question, answer, "
                "reasoning, declined, citations, chunks, model, adapter, owner) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    answer_id,
                    time.time(),
                    kind,
                    session_id,
                    question,
                    answer,
                    reasoning,
                    int(declined),
                    json.dumps(citations),
                    json.dumps(chunks),
                    model,
                    adapter,
                    owner,
                ),
            )
        return answer_id

    def get_answer(self, answer_id: str, owner: str | None = None) -> StoredAnswer:
        """An answer; with ``owner``, only one that owner made (others look absent)."""
        with self.lock:
            row = self.conn.execute(
                "SELECT id, question, answer, citations, chunks, owner FROM answers WHERE id=?",
                (answer_id,),
            ).fetchone()
        if row is None or (owner is not None and row[5] != owner):
            raise NotFoundError(f"no answer with id {answer_id!r}: use the id an answer returned")
        return StoredAnswer(row[0], row[1], row[2], json.loads(row[3]), json.loads(row[4]))

    # Sessions ------------------------------------------------------------------------------
    def new_session_id(self) -> str:
        return f"s_{uuid.uuid4().hex[:16]}"

    def check_owner(self, session_id: str, owner: str | None) -> None:
        """A session someone else started looks like no session at all (404, not 403: its
        existence is not revealed). ``owner`` None skips the check (an unrestricted admin)."""
        check_session_id(session_id)
        if owner is None:
            return
        with self.lock:
            row = self.conn.execute(
                "SELECT owner FROM sessions WHERE id=?", (session_id,)
            ).fetchone()
        if row is not None and row[0] != owner:
            raise NotFoundError(f"no chat session {session_id!r}")

    def history(self, session_id: str, limit: int) -> list[dict[str, str]]:
        """The last ``limit`` messages of a session, oldest first."""
        check_session_id(session_id)
        if limit <= 0:
            return []
        with self.lock:
            rows = self.conn.execute(
                "SELECT role, content FROM messages WHERE session_id=? ORDER BY seq DESC LIMIT ?",
                (session_id, limit),
            ).fetchall()
        return [{"role": r, "content": c} for r, c in reversed(rows)]

    def messages(self, session_id: str) -> list[dict[str, Any]]:
        check_session_id(session_id)
        with self.lock:
            rows = self.conn.execute(
                "SELECT role, content, answer_id, created FROM messages WHERE session_id=? "
                "ORDER BY seq",
                (session_id,),
            ).fetchall()
        if not rows:
            raise NotFoundError(f"no chat session {session_id!r}")
        return [{"role": r, "content": c, "answer_id": a, "created": t} for r, c, a, t in rows]

    def append_turn(
        self,
        session_id: str,
        mode: str,
        question: str,
        answer: str,
        answer_id: str,
        owner: str | None = None,
    ) -> None:
        """Store a user message and its answer together, so a session never holds a question
        without its reply (a failed generation leaves the history as it was)."""
        check_session_id(session_id)
        now = time.time()
        with self.lock, self.conn:
            self.conn.execute(
                "INSERT INTO sessions (id, mode, created, updated, owner) VALUES (?,?,?,?,?) "
                "ON CONFLICT(id) DO UPDATE SET mode=excluded.mode, updated=excluded.updated",
                (session_id, mode, now, now, owner),
            )
            (seq,) = self.conn.execute(
                "SELECT COALESCE(MAX(seq), -1) + 1 FROM messages WHERE session_id=?",
                (session_id,),
            ).fetchone()
            self.conn.executemany(
                "INSERT INTO messages VALUES (?,?,?,?,?,?)",
                [
                    (session_id, seq, "user", question, None, now),
                    (session_id, seq + 1, "assistant", answer, answer_id, now),
                ],
            )

    def delete_session(self, session_id: str) -> bool:
        check_session_id(session_id)
        with self.lock, self.conn:
            n = self.conn.execute("DELETE FROM messages WHERE session_id=?", (session_id,))
            self.conn.execute("DELETE FROM sessions WHERE id=?", (session_id,))
        return n.rowcount > 0

    # Feedback ------------------------------------------------------------------------------
    def add_feedback(
        self,
        answer_id: str,
        rating: int,
        correction: str | None,
        comment: str | None,
        owner: str | None = None,
    ) -> int:
        self.get_answer(answer_id, owner)  # 404 for an unknown answer, before anything is written
        with self.lock, self.conn:
            cur = self.conn.execute(
                "INSERT INTO feedback (answer_id, rating, correction, comment, created) "
                "VALUES (?,?,?,?,?)",
                (answer_id, rating, correction, comment, time.time()),
            )
        return int(cur.lastrowid or 0)

    def feedback(self) -> list[dict[str, Any]]:
        with self.lock:
            rows = self.conn.execute(
                "SELECT f.id, f.answer_id, f.rating, f.correction, f.comment, f.created, "
                "a.question, a.answer FROM feedback f JOIN answers a ON a.id = f.answer_id "
                "ORDER BY f.id"
            ).fetchall()
        keys = ("id", "answer_id", "rating", "correction", "comment", "created")
        return [
            {**dict(zip(keys, r[:6], strict=True)), "question": r[6], "answer": r[7]} for r in rows
        ]

    def corrections_as_qa(self) -> list[dict[str, Any]]:
        """Corrections in the ``--qa-file`` format, so ``docent raft build`` trains on them.
        The evidence is the sentence of a retrieved chunk that holds the corrected answer;
        without one, the first cited source (the build rejects rows it cannot locate)."""
        rows: list[dict[str, Any]] = []
        for fb in self.feedback():
            correction = (fb["correction"] or "").strip()
            if not correction:
                continue
            stored = self.get_answer(fb["answer_id"])
            source, evidence = None, None
            for chunk in stored.chunks:
                sentence = sentence_with(correction, chunk.get("text", ""))
                if sentence:
                    source, evidence = chunk.get("source"), squash(sentence)
                    break
            if source is None and stored.citations:
                source = stored.citations[0].get("source")
            rows.append(
                {
                    "id": f"fb{fb['id']}",
                    "question": stored.question,
                    "answer": correction,
                    "aliases": [],
                    "source": source,
                    "evidence": evidence,
                    "split": "train",
                    "answerable": True,
                    "origin": "feedback",
                }
            )
        return rows

    def export_corrections(self, path: Path) -> Path | None:
        """Write ``corrections_as_qa`` to ``path`` (JSONL, atomically); None when there are none."""
        rows = self.corrections_as_qa()
        if not rows:
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), "utf-8")
        tmp.replace(path)
        return path

    def close(self) -> None:
        with self.lock:
            self.conn.close()


def check_session_id(session_id: str) -> None:
    if not SESSION_ID.match(session_id):
        raise ConfigError(
            "session_id must be 1-64 characters of letters, digits, '_', '-', '.' or ':'"
        )
