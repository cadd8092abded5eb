"""Faults, as an operator meets them, against real ``docent serve`` processes: the remote LLM
dies mid-answer and comes back; the server is SIGKILLed during an index refresh and during a
RAFT regeneration, then restarted; too many questions at once. The remote LLM is a stand-in
(fake_llm.py): the only part here we do not own."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import ROOT, free_port, sse_events, write_corpus, write_qa

FAKE_LLM = Path(__file__).with_name("fake_llm.py")
REFUND = "How long after delivery can an Acme order be refunded?"
ACME = {
    "refunds.md": "# Acme refunds\n\nAcme refunds any order within 30 days of delivery. Refunds "
    "are paid back to the original card within 5 business days.",
    "shipping.md": "# Acme shipping\n\nAcme ships every order from Rotterdam. Standard delivery "
    "takes 3 to 5 working days; express delivery arrives the next working day.",
}


@contextlib.contextmanager
def process(args: list[str], ready_url: str, cwd: Path, env: dict[str, str] | None = None):
    proc = subprocess.Popen(
        args,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 180
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{args[1]} exited early: {proc.stderr.read()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(ready_url, timeout=2).status_code < 500:
                break
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"{args[1]} did not start")
        time.sleep(0.25)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def fake_llm(port: int, cwd: Path, delay: float = 0.05):
    url = f"http://127.0.0.1:{port}"
    return process([sys.executable, str(FAKE_LLM), str(port), str(delay)], f"{url}/v1/models", cwd)


def docent_serve(workspace: Path, port: int, llm_port: int, cwd: Path, **env: str):
    args = [
        sys.executable, "-m", "docent.cli", "--workspace", str(workspace), "serve",
        "--port", str(port), "--engine", "openai",
        "--llm-url", f"http://127.0.0.1:{llm_port}/v1", "--llm-model", "fake",
    ]  # fmt: skip
    return process(args, f"http://127.0.0.1:{port}/healthz", cwd, env)


@pytest.fixture
def site(tmp_path, embedder):
    """A workspace with a small indexed corpus; the folder the servers start in."""
    from docent.settings import DocentSettings
    from ingest.pipeline import refresh_index

    corpus = write_corpus(tmp_path / "corpus", ACME)
    refresh_index([corpus], DocentSettings(workspace=tmp_path / "ws"), embedder=embedder)
    return tmp_path


def test_remote_llm_dying_mid_answer_is_a_503_and_the_service_recovers(site):
    llm_port, port = free_port(), free_port()
    api = f"http://127.0.0.1:{port}"
    with fake_llm(llm_port, site) as llm, docent_serve(site / "ws", port, llm_port, site):
        ok = httpx.post(f"{api}/v1/ask", json={"question": REFUND}, timeout=60)
        assert ok.status_code == 200 and ok.json()["answer"] == "within 30 days"

        # Kill the LLM once the answer has started streaming.
        text = ""
        with httpx.stream(
            "POST", f"{api}/v1/ask", json={"question": REFUND, "stream": True}, timeout=60
        ) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                text += line + "\n"
                if line.startswith("event: delta") and llm.poll() is None:
                    llm.send_signal(signal.SIGKILL)
        events = sse_events(text)
        assert events[-1][0] == "error" and events[-1][1]["status"] == 503
        assert "broke off" in events[-1][1]["detail"]

        down = httpx.post(f"{api}/v1/ask", json={"question": REFUND}, timeout=60)
        assert down.status_code == 503 and int(down.headers["retry-after"]) >= 1
        assert "LLM" in down.json()["detail"] or "reach" in down.json()["detail"]
        health = httpx.get(f"{api}/healthz").json()
        assert health["status"] == "ok"  # a remote that is down may come back: not dead

        with fake_llm(llm_port, site):  # the LLM is back on the same address
            back = httpx.post(f"{api}/v1/ask", json={"question": REFUND}, timeout=60)
            assert back.status_code == 200 and back.json()["answer"] == "within 30 days"


def test_overload_is_shed_with_429_and_retry_after_then_recovers(site):
    llm_port, port = free_port(), free_port()
    api = f"http://127.0.0.1:{port}"
    limits = {"DOCENT_MAX_ACTIVE_ANSWERS": "1", "DOCENT_MAX_QUEUED_ANSWERS": "1"}
    with (
        fake_llm(llm_port, site, delay=0.05),
        docent_serve(site / "ws", port, llm_port, site, **limits),
    ):

        def ask(_: int) -> httpx.Response:
            return httpx.post(f"{api}/v1/ask", json={"question": REFUND}, timeout=60)

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(ask, range(8)))
        codes = sorted(r.status_code for r in replies)
        assert codes.count(200) >= 2 and codes.count(429) >= 1, codes
        assert set(codes) <= {200, 429}
        shed = next(r for r in replies if r.status_code == 429)
        assert int(shed.headers["retry-after"]) >= 1 and "busy" in shed.json()["detail"]
        assert ask(0).status_code == 200  # the load is gone: answered again
        metrics = httpx.get(f"{api}/metrics").text
        assert 'docent_shed_total{reason="queue_full"}' in metrics


def wait_for(check, timeout: float = 120, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("timed out waiting")


def test_sigkill_during_refresh_and_regeneration_loses_nothing(site):
    """The server dies (SIGKILL) in the middle of each job; after a restart the old index and
    the old RAFT set are whole, the jobs say they were interrupted, and running them again
    works (the RAFT build reuses what the killed one finished)."""
    from raft.build import BUILDING, latest_manifest

    # The fake LLM writes the targets: own-words targets would load SmolLM2 in the server.
    recipe = {"DOCENT_RAFT_COT_FORMAT": "reasoning"}
    big = {
        f"notes/note{n:03d}.md": f"# Note {n}\n\n"
        + " ".join(f"Acme warehouse {n} stores crate {n}-{m} on shelf {m}." for m in range(60))
        for n in range(60)
    }
    write_corpus(site / "corpus", big)
    qa = write_qa(
        site / "qa.jsonl",
        [
            (REFUND, "30 days", "refunds.md", "Acme refunds any order within 30 days"),
            ("Where does Acme ship from?", "Rotterdam", "shipping.md", "ships every order"),
        ],
    )
    llm_port, port = free_port(), free_port()
    api = f"http://127.0.0.1:{port}"
    with fake_llm(llm_port, site, delay=0.2):
        with docent_serve(site / "ws", port, llm_port, site, **recipe) as server:
            first = httpx.post(f"{api}/v1/raft/regenerate", json={"qa_file": str(qa)}).json()
            done = wait_for(lambda: _finished(api, first["id"]))
            assert done["state"] == "succeeded", done
            dataset = latest_manifest(site / "ws" / "raft")
            before = httpx.get(f"{api}/readyz").json()

            refresh = httpx.post(f"{api}/v1/index/refresh", json={"paths": ["corpus"]}).json()
            wait_for(lambda: "embed" in _job(api, refresh["id"])["progress"])
            server.send_signal(signal.SIGKILL)
            server.wait()

        with docent_serve(site / "ws", port, llm_port, site, **recipe) as server:
            job = _job(api, refresh["id"])
            assert job["state"] == "failed" and "interrupted" in job["error"]
            ready = httpx.get(f"{api}/readyz").json()
            assert ready["index_version"] == before["index_version"]
            assert ready["chunks"] == before["chunks"]
            assert httpx.post(f"{api}/v1/ask", json={"question": REFUND}, timeout=60).is_success
            redo = httpx.post(f"{api}/v1/index/refresh", json={"paths": ["corpus"]}).json()
            refreshed = wait_for(lambda: _finished(api, redo["id"]), timeout=300)
            assert refreshed["state"] == "succeeded", refreshed
            assert httpx.get(f"{api}/readyz").json()["chunks"] > before["chunks"]

            regen = httpx.post(
                f"{api}/v1/raft/regenerate", json={"qa_file": str(qa), "limit": 24}
            ).json()
            wait_for(lambda: _job(api, regen["id"])["progress"].get("generate", {}).get("done"))
            server.send_signal(signal.SIGKILL)
            server.wait()

        assert latest_manifest(site / "ws" / "raft") == dataset  # the old set, whole
        assert (site / "ws" / "raft" / BUILDING).exists()
        with docent_serve(site / "ws", port, llm_port, site, **recipe):
            job = _job(api, regen["id"])
            assert job["state"] == "failed" and "interrupted" in job["error"]
            again = httpx.post(
                f"{api}/v1/raft/regenerate", json={"qa_file": str(qa), "limit": 24}
            ).json()
            finished = wait_for(lambda: _finished(api, again["id"]), timeout=300)
            assert finished["state"] == "succeeded", finished
            assert finished["result"]["chunks_reused"] > 0  # the killed run's work was kept
            assert latest_manifest(site / "ws" / "raft")["name"] != dataset["name"]


def _job(api: str, job_id: str) -> dict:
    return httpx.get(f"{api}/v1/jobs/{job_id}", timeout=10).json()


def _finished(api: str, job_id: str) -> dict | None:
    job = _job(api, job_id)
    return job if job["state"] in ("succeeded", "failed") else None
