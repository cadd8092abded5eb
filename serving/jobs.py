"""Background jobs (index refresh, RAFT regeneration): one at a time on a worker thread, each
with its state, progress and result kept in ``<workspace>/serving/jobs/<id>.json`` so they
survive a restart (a job cut off by one is marked failed, never left "running")."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from docent.errors import DocentError
from docent.progress import Progress
from serving.metrics import Metrics
from serving.store import NotFoundError

log = logging.getLogger(__name__)
STATES = ("queued", "running", "succeeded", "failed")
PROGRESS_EVERY_S = 0.5  # progress is written to disk at most this often


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


JobFn = Callable[[Progress], dict[str, Any]]


class JobManager:
    def __init__(self, folder: Path, metrics: Metrics | None = None) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.metrics = metrics
        self.lock = threading.Lock()
        self.jobs: dict[str, Job] = {}
        # One worker: refreshes and RAFT builds both want every core, and two refreshes
        # would only queue on the index lock anyway.
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="docent-job")
        self._load()

    def _load(self) -> None:
        for path in sorted(self.folder.glob("job_*.json")):
            try:
                job = Job(**json.loads(path.read_text()))
            except (ValueError, TypeError):
                log.warning("ignoring unreadable job file %s", path)
                continue
            if job.state in ("queued", "running"):
                job.state, job.finished = "failed", time.time()
                job.error = "interrupted: the server stopped before it finished; start it again"
                self._save(job)
            self.jobs[job.id] = job

    def _save(self, job: Job) -> None:
        path = self.folder / f"{job.id}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(job.as_dict()))
        os.replace(tmp, path)

    def submit(self, kind: str, params: dict[str, Any], fn: JobFn) -> Job:
        job = Job(id=f"job_{uuid.uuid4().hex[:16]}", kind=kind, params=params)
        with self.lock:
            self.jobs[job.id] = job
            self._save(job)
        self.pool.submit(self._run, job, fn)
        return job

    def _run(self, job: Job, fn: JobFn) -> None:
        last_write = 0.0

        def progress(stage: str, done: int, total: int) -> None:
            nonlocal last_write
            with self.lock:
                job.progress[stage] = {"done": done, "total": total}
                if time.monotonic() - last_write > PROGRESS_EVERY_S or done >= total:
                    self._save(job)
                    last_write = time.monotonic()

        with self.lock:
            job.state, job.started = "running", time.time()
            self._save(job)
        try:
            result = fn(progress)
            state, error = "succeeded", None
        except DocentError as exc:
            result, state, error = None, "failed", str(exc)
        except Exception as exc:  # a job must end in a state, whatever went wrong
            log.exception("job %s failed", job.id)
            result, state, error = None, "failed", f"{type(exc).__name__}: {exc}"
        with self.lock:
            job.state, job.result, job.error, job.finished = state, result, error, time.time()
            self._save(job)
        if self.metrics:
            self.metrics.jobs.labels(job.kind, state).inc()
        log.info("job %s (%s) %s %s", job.id, job.kind, state, error or "")

    def get(self, job_id: str) -> Job:
        with self.lock:
            job = self.jobs.get(job_id)
            if job is None:
                raise NotFoundError(f"no job with id {job_id!r}")
            return Job(**json.loads(json.dumps(job.as_dict())))  # a snapshot, not the live one

    def list(self, limit: int = 50) -> list[Job]:
        with self.lock:
            jobs = sorted(self.jobs.values(), key=lambda j: -j.created)[:limit]
            return [Job(**json.loads(json.dumps(j.as_dict()))) for j in jobs]

    def busy(self) -> bool:
        with self.lock:
            return any(j.state in ("queued", "running") for j in self.jobs.values())

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
