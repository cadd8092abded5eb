"""Background jobs (index refresh, RAFT regeneration): one at a time on a worker thread, each
with its state, progress and result kept in a job book so they survive a restart (a job cut
off by one is marked failed, never left "running").

Two books: ``<workspace>/serving/jobs/<id>.json`` (embedded; one server per workspace), or
the ``docent_jobs`` table (``DOCENT_STORE=postgresql://…``), where every API replica reads
every job: ``GET /v1/jobs/{id}`` on one replica shows a job another runs, with its progress.
There each row names the replica running it, which beats a heartbeat while the job is
queued or running; a job is marked failed when its replica stops beating or restarts."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from psycopg.types.json import Jsonb

from docent import pg
from docent.errors import DocentError
from docent.progress import Progress
from docent.settings import DocentSettings
from serving.metrics import Metrics
from serving.store import NotFoundError

log = logging.getLogger(__name__)
STATES = ("queued", "running", "succeeded", "failed")
PROGRESS_EVERY_S = 0.5  # progress is written to the book at most this often
HEARTBEAT_EVERY_S = 10.0  # a replica marks its queued and running jobs alive this often
# A job whose replica has not beaten for this long is failed by any other replica: six
# missed beats mean the process is gone (or cut off from the database), not busy.
STALE_AFTER_S = 60.0
INTERRUPTED = "interrupted: the server stopped before it finished; start it again"


@dataclass
class Job:
    id: str
    kind: str
    params: dict[str, Any]
    state: str = "queued"
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    progress: dict[str, dict[str, int]] = field(default_factory=dict)  # stage -> done/total
    result: dict[str, Any] | None = None
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def snapshot(self) -> Job:
        """A copy the worker does not change under the reader."""
        return Job(**json.loads(json.dumps(self.as_dict())))


JobFn = Callable[[Progress], dict[str, Any]]


class JobBook(Protocol):
    """Where jobs are kept."""

    def fail_interrupted(self) -> None:
        """At start: mark failed the jobs a previous run of this server left unfinished."""

    def save(self, job: Job) -> None: ...

    def get(self, job_id: str) -> Job | None: ...

    def recent(self, limit: int) -> list[Job]:
        """The newest ``limit`` jobs, newest first."""

    def close(self) -> None: ...


class JobManager:
    def __init__(self, book: JobBook, metrics: Metrics | None = None) -> None:
        self.book = book
        self.metrics = metrics
        self.lock = threading.Lock()
        self.live: dict[str, Job] = {}  # submitted here, not finished: what the worker updates
        # One worker: refreshes and RAFT builds both want every core, and two refreshes
        # would only queue on the index lock anyway.
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="docent-job")
        book.fail_interrupted()

    def submit(self, kind: str, params: dict[str, Any], fn: JobFn) -> Job:
        job = Job(id=f"job_{uuid.uuid4().hex[:16]}", kind=kind, params=params)
        with self.lock:
            self.book.save(job)  # first: a job the book refused never runs (the caller sees why)
            self.live[job.id] = job
        self.pool.submit(self._run, job, fn)
        return job

    def _run(self, job: Job, fn: JobFn) -> None:
        last_write = 0.0

        def progress(stage: str, done: int, total: int) -> None:
            nonlocal last_write
            with self.lock:
                job.progress[stage] = {"done": done, "total": total}
                if time.monotonic() - last_write > PROGRESS_EVERY_S or done >= total:
                    last_write = time.monotonic()
                    try:
                        self.book.save(job)
                    except Exception as exc:  # noqa: BLE001 - the job goes on; the next write may pass
                        log.warning("could not record the progress of job %s: %s", job.id, exc)

        try:
            with self.lock:
                job.state, job.started = "running", time.time()
                self.book.save(job)
            result = fn(progress)
            state, error = "succeeded", None
        except DocentError as exc:
            result, state, error = None, "failed", str(exc)
        except Exception as exc:  # a job must end in a state, whatever went wrong
            log.exception("job %s failed", job.id)
            result, state, error = None, "failed", f"{type(exc).__name__}: {exc}"
        with self.lock:
            job.state, job.result, job.error, job.finished = state, result, error, time.time()
            del self.live[job.id]
            try:
                self.book.save(job)
            except Exception:
                log.exception("could not record the end of job %s (%s)", job.id, state)
        if self.metrics:
            self.metrics.jobs.labels(job.kind, state).inc()
        log.info("job %s (%s) %s %s", job.id, job.kind, state, error or "")

    def get(self, job_id: str) -> Job:
        with self.lock:
            live = self.live.get(job_id)
            if live is not None:
                return live.snapshot()  # fresher than the book: progress is written at intervals
        job = self.book.get(job_id)
        if job is None:
            raise NotFoundError(f"no job with id {job_id!r}")
        return job

    def list(self, limit: int = 50) -> list[Job]:
        jobs = self.book.recent(limit)
        with self.lock:
            return [self.live[j.id].snapshot() if j.id in self.live else j for j in jobs]

    def busy(self) -> bool:
        """Whether this server's worker has a job queued or running."""
        with self.lock:
            return bool(self.live)

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.book.close()


class FileJobBook:
    """One JSON file per job in ``folder``. One server per workspace, so at start every
    job still queued or running was cut off by its stop."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.jobs: dict[str, Job] = {}
        for path in sorted(folder.glob("job_*.json")):
            try:
                job = Job(**json.loads(path.read_text()))
            except (ValueError, TypeError):
                log.warning("ignoring unreadable job file %s", path)
                continue
            self.jobs[job.id] = job

    def fail_interrupted(self) -> None:
        for job in list(self.jobs.values()):
            if job.state in ("queued", "running"):
                job.state, job.finished, job.error = "failed", time.time(), INTERRUPTED
                self.save(job)

    def save(self, job: Job) -> None:
        path = self.folder / f"{job.id}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(job.as_dict()))
        os.replace(tmp, path)
        with self.lock:
            self.jobs[job.id] = job.snapshot()

    def get(self, job_id: str) -> Job | None:
        with self.lock:
            job = self.jobs.get(job_id)
        return job.snapshot() if job else None

    def recent(self, limit: int) -> list[Job]:
        with self.lock:
            jobs = sorted(self.jobs.values(), key=lambda j: -j.created)[:limit]
        return [j.snapshot() for j in jobs]

    def close(self) -> None:
        pass


JOBS_TABLE = """
CREATE TABLE IF NOT EXISTS docent_jobs (
    id text PRIMARY KEY,
    kind text NOT NULL,
    params jsonb NOT NULL,
    state text NOT NULL,
    created double precision NOT NULL,
    started double precision,
    finished double precision,
    progress jsonb NOT NULL,
    result jsonb,
    error text,
    replica text NOT NULL,  -- the server that runs it (replica_id)
    heartbeat timestamptz NOT NULL DEFAULT now()  -- the database's clock: replicas' may differ
);
CREATE INDEX IF NOT EXISTS docent_jobs_created ON docent_jobs (created DESC);
"""
JOB_COLUMNS = "id, kind, params, state, created, started, finished, progress, result, error"


class PgJobBook:
    """Jobs in the ``docent_jobs`` table, shared by every replica. This one's jobs carry its
    ``replica`` id; a timer beats their heartbeat every HEARTBEAT_EVERY_S (saves beat it
    too), and fails any replica's job that has not beaten for STALE_AFTER_S."""

    def __init__(self, pool: pg.Pool, replica: str) -> None:
        self.pool = pool
        self.replica = replica
        with pool.connection() as conn:
            pg.create_tables(conn, JOBS_TABLE)
        self._stop = threading.Event()
        self._timer = threading.Thread(
            target=self._beat_until_closed, daemon=True, name="docent-job-heartbeat"
        )
        self._timer.start()

    def fail_interrupted(self) -> None:
        """Jobs of a previous run of this replica (it held them, it does not now), and any
        replica's jobs whose heartbeat stopped; never a live replica's."""
        self._fail_unfinished(self.replica)

    def _fail_unfinished(self, replica: str | None) -> None:
        with self.pool.connection() as conn:
            cur = conn.execute(
                "UPDATE docent_jobs SET state = 'failed', "
                "finished = extract(epoch FROM now()), "
                "error = 'interrupted: replica ' || replica || ' stopped before it finished "
                "(it restarted, or sent no heartbeat for ' || %s || ' s); start it again' "
                "WHERE state IN ('queued', 'running') "
                "AND (heartbeat < now() - make_interval(secs => %s) OR replica = %s)",
                (str(int(STALE_AFTER_S)), STALE_AFTER_S, replica),
            )
            if cur.rowcount:
                log.warning("marked %d interrupted job(s) failed", cur.rowcount)

    def _beat_until_closed(self) -> None:
        while not self._stop.wait(HEARTBEAT_EVERY_S):
            try:
                with self.pool.connection() as conn:
                    conn.execute(
                        "UPDATE docent_jobs SET heartbeat = now() "
                        "WHERE replica = %s AND state IN ('queued', 'running')",
                        (self.replica,),
                    )
                self._fail_unfinished(None)  # other replicas' jobs whose beat stopped
            except Exception as exc:  # noqa: BLE001 - the next beat tries again
                log.warning("job heartbeat failed: %s", exc)

    def save(self, job: Job) -> None:
        with self.pool.connection() as conn:
            conn.execute(
                f"INSERT INTO docent_jobs ({JOB_COLUMNS}, replica) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
                "ON CONFLICT (id) DO UPDATE SET state = excluded.state, "
                "started = excluded.started, finished = excluded.finished, "
                "progress = excluded.progress, result = excluded.result, "
                "error = excluded.error, heartbeat = now()",
                (
                    job.id,
                    job.kind,
                    Jsonb(job.params),
                    job.state,
                    job.created,
                    job.started,
                    job.finished,
                    Jsonb(job.progress),
                    Jsonb(job.result) if job.result is not None else None,
                    job.error,
                    self.replica,
                ),
            )

    def get(self, job_id: str) -> Job | None:
        with self.pool.connection() as conn:
            row = conn.execute(
                f"SELECT {JOB_COLUMNS} FROM docent_jobs WHERE id = %s", (job_id,)
            ).fetchone()
        return Job(*row) if row else None

    def recent(self, limit: int) -> list[Job]:
        with self.pool.connection() as conn:
            rows = conn.execute(
                f"SELECT {JOB_COLUMNS} FROM docent_jobs ORDER BY created DESC LIMIT %s", (limit,)
            ).fetchall()
        return [Job(*row) for row in rows]

    def close(self) -> None:
        self._stop.set()
        self._timer.join(timeout=5)


def replica_id(settings: DocentSettings) -> str:
    """This server among the replicas: host name and port, the same across its restarts (so
    a restart fails the jobs its previous run held) and different between replicas."""
    return f"{socket.gethostname()}:{settings.port}"


def open_jobs(
    settings: DocentSettings, folder: Path, metrics: Metrics | None, pool: pg.Pool | None
) -> JobManager:
    """Jobs in ``folder`` (embedded: ``pool`` None), or in the Postgres store on ``pool``."""
    if pool is None:
        return JobManager(FileJobBook(folder), metrics)
    return JobManager(PgJobBook(pool, replica_id(settings)), metrics)
