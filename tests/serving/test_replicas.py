"""Two ``docent serve`` replicas on one Postgres database (DOCENT_STORE), each with its own
workspace folder, as behind a load balancer: the same questions get the same context from
either, a refresh started on one is a job the other can read, and while it runs no answer
mixes the old index with the new one; once it is committed neither replica answers from the
old one. Then one replica is SIGKILLed in the middle of a refresh: the other keeps answering
from the last committed index, can refresh at once (the lock died with the killed one's
session), and the restarted replica reports its job as interrupted. The remote LLM is
fake_llm.py, the one part here we do not own."""

from __future__ import annotations

import concurrent.futures
import signal
import time

import httpx
from test_faults import ACME, REFUND, docent_serve, fake_llm, wait_for

from conftest import free_port, write_corpus

SHIPPING = "Where does Acme ship from?"
RETURNS = {
    "returns.md": "# Acme returns\n\nReturned Acme parcels are inspected at the Utrecht depot "
    "within 2 working days of arrival."
}


def _ask(api: str, question: str) -> httpx.Response:
    return httpx.post(f"{api}/v1/ask", json={"question": question, "k": 5}, timeout=60)


def _context(response: httpx.Response) -> dict[str, str]:
    assert response.status_code == 200, response.text
    return {c["source"]: c["text"] for c in response.json()["chunks"]}


def _version(context: dict[str, str]) -> str:
    """Which index an answer's context came from; 'mixed' if from parts of both."""
    old = "30 days" in context.get("refunds.md", "") and "returns.md" not in context
    new = "45 days" in context.get("refunds.md", "") and "returns.md" in context
    return "old" if old else "new" if new else "mixed"


def test_two_replicas_answer_consistently_during_a_refresh(tmp_path, embedder, pg_url):
    from docent.settings import DocentSettings
    from ingest.pipeline import refresh_index

    corpus = write_corpus(tmp_path / "corpus", ACME)
    refresh_index(
        [corpus], DocentSettings(workspace=tmp_path / "ingest", store=pg_url), embedder=embedder
    )
    llm_port, port_a, port_b = free_port(), free_port(), free_port()
    a, b = f"http://127.0.0.1:{port_a}", f"http://127.0.0.1:{port_b}"
    env = {"DOCENT_STORE": pg_url}
    with (
        fake_llm(llm_port, tmp_path, delay=0.0),
        docent_serve(tmp_path / "ws-a", port_a, llm_port, tmp_path, **env) as server_a,
        docent_serve(tmp_path / "ws-b", port_b, llm_port, tmp_path, **env),
    ):
        for question in (REFUND, SHIPPING):
            assert _context(_ask(a, question)) == _context(_ask(b, question))
        assert _version(_context(_ask(b, REFUND))) == "old"

        # A chat session started on one replica is continued on the other.
        chat = httpx.post(f"{a}/v1/chat", json={"message": REFUND}, timeout=60).json()
        more = httpx.post(
            f"{b}/v1/chat",
            json={"session_id": chat["session_id"], "message": SHIPPING},
            timeout=60,
        )
        assert more.status_code == 200, more.text
        history = httpx.get(f"{a}/v1/chat/{chat['session_id']}", timeout=10).json()
        assert [m["role"] for m in history["messages"]] == ["user", "assistant"] * 2

        text = (corpus / "refunds.md").read_text().replace("30 days", "45 days")
        (corpus / "refunds.md").write_text(text)
        write_corpus(corpus, RETURNS)
        job = httpx.post(f"{a}/v1/index/refresh", json={"paths": ["corpus"]}).json()
        seen: list[str] = []
        errors: list[str] = []
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            deadline = time.monotonic() + 120
            while True:
                state = httpx.get(f"{b}/v1/jobs/{job['id']}", timeout=10).json()  # B reads A's
                answers = pool.map(lambda api: _ask(api, REFUND), [a, b, a, b])
                for response in answers:
                    if response.status_code != 200:
                        errors.append(response.text)
                    else:
                        seen.append(_version(_context(response)))
                if state["state"] in ("succeeded", "failed") or time.monotonic() > deadline:
                    break
        assert state["state"] == "succeeded", state
        assert state["result"]["added"] == 1 and state["result"]["updated"] == 1
        assert not errors and "mixed" not in seen, (errors, seen)

        # Committed: both replicas answer from the new index at once, with the same context.
        after = [_context(_ask(api, REFUND)) for api in (a, b, a, b)]
        assert [_version(c) for c in after] == ["new"] * 4 and after[0] == after[1]
        for api in (a, b):  # and both report it as soon as they look (every 2 s)
            deadline = time.monotonic() + 30
            while httpx.get(f"{api}/readyz").json()["index_version"] != "v000002":
                assert time.monotonic() < deadline, f"{api} still reports the old version"
                time.sleep(0.5)
        print(f"answers during the refresh: {seen.count('old')} old, {seen.count('new')} new")

        # Replica A dies (SIGKILL) while it refreshes 60 new notes; B is not affected.
        write_corpus(corpus, NOTES)
        killed = httpx.post(f"{a}/v1/index/refresh", json={"paths": ["corpus"]}).json()
        wait_for(lambda: "embed" in httpx.get(f"{b}/v1/jobs/{killed['id']}").json()["progress"])
        server_a.send_signal(signal.SIGKILL)
        server_a.wait()
        context = _context(_ask(b, REFUND))
        assert _version(context) == "new" and not any(s.startswith("notes/") for s in context)
        redo = httpx.post(f"{b}/v1/index/refresh", json={"paths": ["corpus"]}).json()
        done = wait_for(lambda: _finished(b, redo["id"]), timeout=300)
        assert done["state"] == "succeeded" and done["result"]["added"] >= len(NOTES), done
        with docent_serve(tmp_path / "ws-a", port_a, llm_port, tmp_path, **env):
            job = httpx.get(f"{a}/v1/jobs/{killed['id']}").json()
            assert job["state"] == "failed" and "interrupted" in job["error"], job
            ready = [httpx.get(f"{api}/readyz").json() for api in (a, b)]
            assert ready[0]["index_version"] == ready[1]["index_version"] == "v000003"
            assert ready[0]["chunks"] == ready[1]["chunks"] > 3 + len(NOTES)


NOTES = {
    f"notes/note{n:03d}.md": f"# Note {n}\n\n"
    + " ".join(f"Acme warehouse {n} stores crate {n}-{m} on shelf {m}." for m in range(40))
    for n in range(40)
}


def _finished(api: str, job_id: str) -> dict | None:
    job = httpx.get(f"{api}/v1/jobs/{job_id}", timeout=10).json()
    return job if job["state"] in ("succeeded", "failed") else None
