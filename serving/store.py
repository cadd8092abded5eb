"""What the API keeps: answers (so feedback can point at one), chat sessions and feedback.

Embedded (the default): one SQLite file in WAL mode under ``<workspace>/serving``. With
``DOCENT_STORE=postgresql://…``: the same tables, prefixed ``docent_``, in that database, so
every API replica sees every session and rating. Both share the SQL and the logic here; they
differ in how they connect, their CREATE statements and how an insert returns its id.
Safe across threads, and (Postgres) across replicas: see ``append_turn``."""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from docent import pg
from docent.errors import ConfigError
from docent.prompts import squash
from docent.settings import DocentSettings
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
PG_SCHEMA = """
CREATE TABLE IF NOT EXISTS docent_answers (
    id text PRIMARY KEY, created double precision, kind text, session_id text, question text,
    answer text, reasoning text, declined integer, citations text, chunks text,
    model text, adapter text, owner text
);
CREATE TABLE IF NOT EXISTS docent_sessions (
    id text PRIMARY KEY, mode text, created double precision, updated double precision,
    owner text
);
CREATE TABLE IF NOT EXISTS docent_messages (
    session_id text, seq integer, role text, content text, answer_id text,
    created double precision, PRIMARY KEY (session_id, seq)
);
CREATE TABLE IF NOT EXISTS docent_feedback (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, answer_id text, rating integer,
    correction text, comment text, created double precision
);
CREATE INDEX IF NOT EXISTS docent_feedback_answer ON docent_feedback (answer_id);
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
    reasoning: str = ""  # the model's text before its answer line, as parse_answer split it
    kind: str = ""  # ask, chat or openai


class _Cursor(Protocol):
    """What sqlite3's and psycopg's cursors both offer."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


Query = Callable[..., _Cursor]  # (sql, params=()) -> cursor, inside one transaction


class ServingStore:
    """The SQLite store; ``PgServingStore`` swaps the connection. SQL is written once: tables
    as ``{p}answers`` (the prefix) and parameters as ``?``."""

    prefix = ""

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

    # The dialect: how a transaction runs and how an insert returns its id ---------------
    @contextmanager
    def _transaction(self) -> Iterator[Query]:
        """One transaction: committed when the block ends, rolled back if it raises."""
        with self.lock, self.conn:
            yield lambda sql, params=(): self.conn.execute(sql.format(p=self.prefix), params)

    def _insert_id(self, query: Query, sql: str, params: tuple[Any, ...]) -> int:
        return int(query(sql, params).lastrowid or 0)  # type: ignore[attr-defined]

    def _rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        with self._transaction() as query:
            return query(sql, params).fetchall()

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
        with self._transaction() as query:
            query(
                "INSERT INTO {p}answers (id, created, kind, session_id, question, answer, "
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
        rows = self._rows(
            "SELECT id, question, answer, citations, chunks, owner, reasoning, kind "
            "FROM {p}answers WHERE id=?",
            (answer_id,),
        )
        if not rows or (owner is not None and rows[0][5] != owner):
            raise NotFoundError(f"no answer with id {answer_id!r}: use the id an answer returned")
        row = rows[0]
        return StoredAnswer(
            row[0], row[1], row[2], json.loads(row[3]), json.loads(row[4]), row[6] or "", row[7]
        )

    # Sessions ------------------------------------------------------------------------------
    def new_session_id(self) -> str:
        return f"s_{uuid.uuid4().hex[:16]}"

    def check_owner(self, session_id: str, owner: str | None) -> None:
        """A session someone else started looks like no session at all (404, not 403: its
        existence is not revealed). ``owner`` None skips the check (an unrestricted admin)."""
        check_session_id(session_id)
        if owner is None:
            return
        rows = self._rows("SELECT owner FROM {p}sessions WHERE id=?", (session_id,))
        if rows and rows[0][0] != owner:
            raise NotFoundError(f"no chat session {session_id!r}")

    def history(self, session_id: str, limit: int) -> list[dict[str, str]]:
        """The last ``limit`` messages of a session, oldest first."""
        check_session_id(session_id)
        if limit <= 0:
            return []
        rows = self._rows(
            "SELECT role, content FROM {p}messages WHERE session_id=? ORDER BY seq DESC LIMIT ?",
            (session_id, limit),
        )
        return [{"role": r, "content": c} for r, c in reversed(rows)]

    def messages(self, session_id: str) -> list[dict[str, Any]]:
        check_session_id(session_id)
        rows = self._rows(
            "SELECT role, content, answer_id, created FROM {p}messages WHERE session_id=? "
            "ORDER BY seq",
            (session_id,),
        )
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
        without its reply (a failed generation leaves the history as it was).

        Turns of one session are numbered one transaction at a time: the session row's
        upsert comes first and locks that row until the commit (SQLite: the whole database),
        so a second replica appending to the same session waits there, then reads a MAX(seq)
        that includes the first one's turn. The primary key (session_id, seq) is the
        backstop."""
        check_session_id(session_id)
        now = time.time()
        with self._transaction() as query:
            query(
                "INSERT INTO {p}sessions (id, mode, created, updated, owner) VALUES (?,?,?,?,?) "
                "ON CONFLICT(id) DO UPDATE SET mode=excluded.mode, updated=excluded.updated",
                (session_id, mode, now, now, owner),
            )
            (seq,) = query(
                "SELECT COALESCE(MAX(seq), -1) + 1 FROM {p}messages WHERE session_id=?",
                (session_id,),
            ).fetchone()
            query(
                "INSERT INTO {p}messages (session_id, seq, role, content, answer_id, created) "
                "VALUES (?,?,?,?,?,?), (?,?,?,?,?,?)",
                (session_id, seq, "user", question, None, now)
                + (session_id, seq + 1, "assistant", answer, answer_id, now),
            )

    def delete_session(self, session_id: str) -> bool:
        check_session_id(session_id)
        with self._transaction() as query:
            deleted = query("DELETE FROM {p}messages WHERE session_id=?", (session_id,)).rowcount
            query("DELETE FROM {p}sessions WHERE id=?", (session_id,))
        return deleted > 0

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
        with self._transaction() as query:
            return self._insert_id(
                query,
                "INSERT INTO {p}feedback (answer_id, rating, correction, comment, created) "
                "VALUES (?,?,?,?,?)",
                (answer_id, rating, correction, comment, time.time()),
            )

    def feedback(self) -> list[dict[str, Any]]:
        rows = self._rows(
            "SELECT f.id, f.answer_id, f.rating, f.correction, f.comment, f.created, "
            "a.question, a.answer FROM {p}feedback f JOIN {p}answers a ON a.id = f.answer_id "
            "ORDER BY f.id"
        )
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


class PgServingStore(ServingStore):
    """The same store in Postgres (``DOCENT_STORE=postgresql://…``), on connections from
    ``pool``; every replica reads and writes the same rows. ``owns_pool``: close the pool
    with the store (one opened for it alone)."""

    prefix = "docent_"

    def __init__(self, pool: pg.Pool, owns_pool: bool = False) -> None:
        self.pool = pool
        self.owns_pool = owns_pool
        with pool.connection() as conn:
            pg.create_tables(conn, PG_SCHEMA)

    @contextmanager
    def _transaction(self) -> Iterator[Query]:
        with self.pool.connection() as conn, conn.transaction():
            yield lambda sql, params=(): conn.execute(
                sql.format(p=self.prefix).replace("?", "%s"), params
            )

    def _insert_id(self, query: Query, sql: str, params: tuple[Any, ...]) -> int:
        return int(query(sql + " RETURNING id", params).fetchone()[0])

    def close(self) -> None:
        if self.owns_pool:
            self.pool.close()


def open_serving_store(
    settings: DocentSettings, folder: Path, pool: pg.Pool | None = None
) -> ServingStore:
    """The store ``settings.store`` names: the SQLite file in ``folder`` (embedded), or the
    Postgres tables, on ``pool`` if given (else on a small pool of its own)."""
    if not settings.uses_postgres:
        return ServingStore(folder)
    if pool is None:
        return PgServingStore(pg.Pool(settings.store, settings.pg_ef_search, 2), owns_pool=True)
    return PgServingStore(pool)


def check_session_id(session_id: str) -> None:
    if not SESSION_ID.match(session_id):
        raise ConfigError(
            "session_id must be 1-64 characters of letters, digits, '_', '-', '.' or ':'"
        )
