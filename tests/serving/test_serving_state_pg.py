"""The API's serving state on both stores, and shared by replicas on a Postgres one: answers,
chat sessions and feedback (serving/store.py), jobs (serving/jobs.py) and the promoted
adapter (raft/registry_store.py). A "replica" here is a store, job manager or registry with
its own connections to the same database (a real PostgreSQL, from conftest's ``pg_url``)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from docent import pg
from docent.engine.base import ChatRequest, Completion, Engine, Progress
from docent.models import generator_id
from docent.settings import DocentSettings
from raft.adapters import METADATA, AdapterError
from raft.registry_store import open_registry
from serving.jobs import FileJobBook, Job, JobManager, PgJobBook
from serving.store import NotFoundError, ServingStore, open_serving_store

from conftest import STORES, settings_on


@pytest.fixture
def pools(pg_url) -> Iterator[Callable[[], pg.Pool]]:
    """Pools on the test's database, one per "replica"; closed after the test."""
    made: list[pg.Pool] = []

    def new() -> pg.Pool:
        made.append(pg.Pool(pg_url, max_size=4))
        return made[-1]

    yield new
    for pool in made:
        pool.close()


def open_stores(store: str, request, tmp_path: Path, n: int) -> list[ServingStore]:
    """``n`` stores on one database: Postgres with a pool each, or n connections to one
    SQLite file."""
    settings = settings_on(store, request, workspace=tmp_path)
    return [open_serving_store(settings, tmp_path / "serving") for _ in range(n)]


def answer(store: ServingStore, question: str, owner: str | None = None, **kw) -> str:
    return store.save_answer(
        kind=kw.get("kind", "ask"),
        question=question,
        answer=f"answer to {question}",
        reasoning="because the handbook says so",
        declined=False,
        citations=[{"source": "desk.md"}],
        chunks=[{"source": "desk.md", "text": "The Orbit help desk opens at 08:30 on weekdays."}],
        model="smol",
        adapter=None,
        owner=owner,
    )


# Answers, sessions, feedback ----------------------------------------------------------------
@pytest.mark.parametrize("store_kind", STORES)
def test_answers_sessions_and_feedback_round_trip(store_kind, request, tmp_path):
    (store,) = open_stores(store_kind, request, tmp_path, 1)
    try:
        answer_id = answer(store, "When does the desk open?", owner="k1")
        stored = store.get_answer(answer_id)
        assert stored.question == "When does the desk open?"
        assert stored.citations == [{"source": "desk.md"}]
        assert (stored.reasoning, stored.kind) == ("because the handbook says so", "ask")
        assert store.get_answer(answer_id, owner="k1").id == answer_id
        with pytest.raises(NotFoundError):
            store.get_answer(answer_id, owner="someone else")

        session = store.new_session_id()
        store.append_turn(session, "default", "q1", "a1", answer_id, owner="k1")
        store.append_turn(session, "default", "q2", "a2", answer_id, owner="k1")
        assert store.history(session, 3) == [
            {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "q2"},
            {"role": "assistant", "content": "a2"},
        ]
        assert [m["content"] for m in store.messages(session)] == ["q1", "a1", "q2", "a2"]
        store.check_owner(session, "k1")
        with pytest.raises(NotFoundError):
            store.check_owner(session, "k2")

        fb = store.add_feedback(answer_id, -1, "08:30", "it opens at 08:30", owner="k1")
        assert fb > 0
        [row] = store.feedback()
        assert (row["id"], row["rating"], row["correction"]) == (fb, -1, "08:30")
        assert row["question"] == "When does the desk open?"
        [qa] = store.corrections_as_qa()
        assert qa["evidence"] == "The Orbit help desk opens at 08:30 on weekdays."
        with pytest.raises(NotFoundError):
            store.add_feedback("ans_missing", 1, None, None)

        assert store.delete_session(session)
        assert not store.delete_session(session)
        with pytest.raises(NotFoundError):
            store.messages(session)
    finally:
        store.close()


def test_two_replicas_see_each_others_sessions_and_feedback(pools):
    from serving.store import PgServingStore

    a, b = PgServingStore(pools()), PgServingStore(pools())
    answer_id = answer(a, "How much is a lab badge?", owner="k1")
    a.append_turn("s_shared", "default", "How much is a lab badge?", "12 EUR", answer_id, "k1")
    assert b.get_answer(answer_id, owner="k1").answer == "answer to How much is a lab badge?"
    b.check_owner("s_shared", "k1")
    with pytest.raises(NotFoundError):
        b.check_owner("s_shared", "k2")  # the owner travels with the session
    b.append_turn("s_shared", "default", "And a lost one?", "within 2 days", answer_id, "k1")
    assert [m["content"] for m in a.messages("s_shared")][-2:] == [
        "And a lost one?",
        "within 2 days",
    ]
    b.add_feedback(answer_id, 1, None, "right", owner="k1")
    assert [f["comment"] for f in a.feedback()] == ["right"]
    assert a.delete_session("s_shared")
    with pytest.raises(NotFoundError):
        b.messages("s_shared")


@pytest.mark.parametrize("store_kind", STORES)
def test_concurrent_turns_on_one_session_get_unique_ordered_seq(store_kind, request, tmp_path):
    """Four threads on two stores (two replicas: two pools, or two SQLite connections) append
    turns to one new session at once: every turn lands, numbered without a gap, each
    question right before its own answer."""
    stores = open_stores(store_kind, request, tmp_path, 2)
    answer_id = answer(stores[0], "q")
    threads, turns = 4, 10
    start = threading.Barrier(threads)
    errors: list[BaseException] = []

    def append(worker: int) -> None:
        store = stores[worker % 2]
        start.wait()
        try:
            for i in range(turns):
                store.append_turn(
                    "s_busy", "default", f"q{worker}.{i}", f"a{worker}.{i}", answer_id
                )
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    workers = [threading.Thread(target=append, args=(w,)) for w in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    try:
        assert not errors, errors
        messages = stores[1].messages("s_busy")
        assert len(messages) == 2 * threads * turns
        for user, assistant in zip(messages[::2], messages[1::2], strict=True):
            assert (user["role"], assistant["role"]) == ("user", "assistant")
            assert user["content"][1:] == assistant["content"][1:]  # q3.7 then a3.7
        for w in range(threads):  # each thread's turns in the order it made them
            mine = [m["content"] for m in messages if m["content"].startswith(f"q{w}.")]
            assert mine == [f"q{w}.{i}" for i in range(turns)]
    finally:
        for store in stores:
            store.close()


# Jobs ---------------------------------------------------------------------------------------
def wait_for(condition: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def blocking_job(release: threading.Event) -> Callable:
    def run(progress) -> dict:
        progress("embed", 3, 10)
        assert release.wait(30)
        progress("embed", 10, 10)
        return {"chunks": 10}

    return run


def test_a_job_started_on_one_replica_is_read_on_another(pools):
    a = JobManager(PgJobBook(pools(), "replica-a"))
    b = JobManager(PgJobBook(pools(), "replica-b"))
    release = threading.Event()
    try:
        job = a.submit("index_refresh", {"paths": ["docs"]}, blocking_job(release))
        wait_for(lambda: b.get(job.id).progress.get("embed", {}).get("done") == 3)
        seen = b.get(job.id)
        assert (seen.state, seen.kind, seen.params) == (
            "running",
            "index_refresh",
            {"paths": ["docs"]},
        )
        assert not b.busy() and a.busy()  # busy: this replica's own worker
        release.set()
        wait_for(lambda: b.get(job.id).state == "succeeded")
        done = b.get(job.id)
        assert done.result == {"chunks": 10} and done.progress["embed"] == {"done": 10, "total": 10}
        assert done.finished and done.started and done.error is None
        assert [j.id for j in b.list()] == [job.id] == [j.id for j in a.list()]
        with pytest.raises(NotFoundError):
            b.get("job_missing")
    finally:
        release.set()
        a.shutdown()
        b.shutdown()


def test_embedded_jobs_survive_a_restart_and_unfinished_ones_fail(tmp_path):
    """The embedded book, as before: one server per workspace, so at start every job still
    queued or running was cut off by its stop."""
    first = JobManager(FileJobBook(tmp_path))
    release = threading.Event()
    done = first.submit("probe", {"n": 1}, lambda progress: {"ok": True})
    wait_for(lambda: first.get(done.id).state == "succeeded")
    cut = first.submit("index_refresh", {}, blocking_job(release))
    wait_for(lambda: first.get(cut.id).progress.get("embed", {}).get("done") == 3)
    assert (tmp_path / f"{cut.id}.json").exists()
    second = JobManager(FileJobBook(tmp_path))  # the restart, while the first still runs it
    try:
        assert second.get(done.id).result == {"ok": True}
        assert second.get(cut.id).state == "failed"
        assert "interrupted" in (second.get(cut.id).error or "")
        assert [j.id for j in second.list()] == [cut.id, done.id]
    finally:
        release.set()
        first.shutdown()
        second.shutdown()


def test_a_replica_starting_fails_only_jobs_nobody_runs(pools, pg_url):
    a = JobManager(PgJobBook(pools(), "replica-a"))
    release = threading.Event()
    try:
        live = a.submit("index_refresh", {}, blocking_job(release))
        wait_for(lambda: a.get(live.id).state == "running")
        # A job of a replica that died two minutes ago, and one this replica ("replica-b")
        # held before it restarted (its heartbeat is fresh: the restart was quick).
        dead_book = PgJobBook(pools(), "replica-dead")
        before_book = PgJobBook(pools(), "replica-b")
        dead_book.close()
        before_book.close()
        dead, before = Job("job_dead", "raft_regenerate", {}), Job("job_before", "loop", {})
        dead.state = before.state = "running"
        dead_book.save(dead)
        before_book.save(before)
        with pg.connect(pg_url) as conn:
            conn.execute(
                "UPDATE docent_jobs SET heartbeat = now() - interval '2 minutes' "
                "WHERE id = 'job_dead'"
            )

        b = JobManager(PgJobBook(pools(), "replica-b"))
        try:
            assert b.get(live.id).state == "running"  # replica-a is alive: not touched
            for job_id, replica in (("job_dead", "replica-dead"), ("job_before", "replica-b")):
                job = b.get(job_id)
                assert job.state == "failed" and job.finished
                assert f"interrupted: replica {replica} stopped" in (job.error or "")
            release.set()
            wait_for(lambda: b.get(live.id).state == "succeeded")
        finally:
            b.shutdown()
    finally:
        release.set()
        a.shutdown()


def test_the_heartbeat_keeps_a_long_job_alive_and_stops_with_its_replica(
    pools, pg_url, monkeypatch
):
    """A job running longer than STALE_AFTER_S without progress is kept alive by its
    replica's timer; once that replica is gone, another replica's timer fails it."""
    import serving.jobs as jobs

    monkeypatch.setattr(jobs, "HEARTBEAT_EVERY_S", 0.2)
    monkeypatch.setattr(jobs, "STALE_AFTER_S", 1.0)
    a = JobManager(PgJobBook(pools(), "replica-a"))
    b = JobManager(PgJobBook(pools(), "replica-b"))
    release = threading.Event()
    try:
        job = a.submit("index_refresh", {}, blocking_job(release))
        time.sleep(2.5)  # > STALE_AFTER_S with no progress written; b's timer sweeps meanwhile
        assert b.get(job.id).state == "running"
        a.book.close()  # replica-a's heartbeat stops (as when its process dies)
        wait_for(lambda: b.get(job.id).state == "failed", timeout=10)
        assert "replica replica-a stopped" in (b.get(job.id).error or "")
    finally:
        release.set()
        a.shutdown()
        b.shutdown()


# The promoted adapter -----------------------------------------------------------------------
def fake_adapter(workspace: Path, name: str) -> None:
    folder = workspace / "adapters" / name
    folder.mkdir(parents=True)
    (folder / METADATA).write_text(
        json.dumps({"name": name, "base_model": generator_id("default")})
    )


def test_the_promoted_adapter_is_shared_by_replicas(pools, pg_url, tmp_path):
    settings = DocentSettings(workspace=tmp_path, store=pg_url)
    fake_adapter(tmp_path, "first")
    fake_adapter(tmp_path, "second")
    cli = open_registry(settings)  # a connection per call, as `docent adapters promote`
    replica = open_registry(settings, pools())  # a server's pool
    assert replica.promoted() is None
    cli.promote("first", "default")
    cli.promote("second", "default")
    promoted = replica.promoted()
    assert promoted is not None and promoted.name == "second"
    assert [a.name for a in replica.list() if a.promoted] == ["second"]
    assert not (tmp_path / "adapters" / "registry.json").exists()  # the database holds it
    rolled = replica.rollback()
    assert rolled is not None and rolled.name == "first"
    assert cli.promoted().name == "first"  # type: ignore[union-attr]
    with pytest.raises(AdapterError, match="promoted or in the promotion history"):
        cli.remove("first")
    # The embedded store keeps it in registry.json, as before.
    embedded = open_registry(DocentSettings(workspace=tmp_path))
    assert embedded.promoted() is None


# Two API replicas ---------------------------------------------------------------------------
class ScriptedEngine(Engine):
    """Answers every question the same way and remembers what it was asked."""

    kind = "scripted"

    def __init__(self, name: str) -> None:
        self.model = name
        self.seen: list[ChatRequest] = []

    def generate(
        self, requests: Sequence[ChatRequest], progress: Progress | None = None
    ) -> list[Completion]:
        self.seen.extend(requests)
        return [Completion("<ANSWER>: 14 days", 1, 1, "stop", self.model) for _ in requests]


def test_two_api_replicas_share_chat_sessions_feedback_and_jobs(
    handbook_pg_settings, embedder, tmp_path
):
    """Two servers on one Postgres store (the session's handbook database) and one workspace:
    a chat started on one continues on the other with its history, feedback given on one is
    listed by the other, and a job submitted through one is read through the other."""
    from fastapi.testclient import TestClient

    from serving.app import create_app

    engines = [ScriptedEngine("replica-a"), ScriptedEngine("replica-b")]
    apps = [
        create_app(
            handbook_pg_settings.with_overrides(workspace=tmp_path, port=port, api_keys=None),
            engine=engine,
            embedder=embedder,
        )
        for port, engine in zip((18001, 18002), engines, strict=True)
    ]
    with TestClient(apps[0]) as a, TestClient(apps[1]) as b:
        first = a.post("/v1/chat", json={"message": "How long is an invitation link valid?"})
        assert first.status_code == 200, first.text
        session = first.json()["session_id"]
        second = b.post("/v1/chat", json={"session_id": session, "message": "And a new one?"})
        assert second.status_code == 200, second.text
        history = [m["content"] for m in engines[1].seen[-1].messages]
        assert any("How long is an invitation link valid?" in m for m in history)
        turns = b.get(f"/v1/chat/{session}").json()["messages"]
        assert [m["role"] for m in turns] == ["user", "assistant"] * 2
        assert a.get(f"/v1/chat/{session}").json() == b.get(f"/v1/chat/{session}").json()

        rated = b.post("/v1/feedback", json={"answer_id": first.json()["id"], "rating": 1})
        assert rated.status_code == 200, rated.text
        assert [f["answer_id"] for f in a.get("/v1/feedback").json()["feedback"]] == [
            first.json()["id"]
        ]
        job = a.app.state.docent.jobs.submit("probe", {}, lambda progress: {"ok": True})
        wait_for(lambda: b.get(f"/v1/jobs/{job.id}").json()["state"] == "succeeded")
        assert b.get(f"/v1/jobs/{job.id}").json()["result"] == {"ok": True}
        assert b.delete(f"/v1/chat/{session}").status_code == 200
        assert a.get(f"/v1/chat/{session}").status_code == 404
