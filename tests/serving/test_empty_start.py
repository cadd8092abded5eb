"""An operator's first day: start the server on an empty workspace with no keys (loopback),
see it is not ready, upload documents, and ask once the refresh job has published an index."""

from __future__ import annotations

import time

import httpx

from docent.settings import DocentSettings

from conftest import free_port, serve_in_thread

DOC = (
    "# Parking\n\nStaff park in the Juniper garage. Each permit costs 14 euros per month and is "
    "renewed on the first working day of the quarter.\n"
)


def test_start_empty_upload_then_answer(tmp_path, embedder, hf_serving_engine):
    from serving.app import create_app

    port = free_port()
    settings = DocentSettings(workspace=tmp_path / "ws", port=port, answer_max_tokens=16)
    app = create_app(settings, engine=hf_serving_engine, embedder=embedder)
    with serve_in_thread(app, port) as url, httpx.Client(base_url=url, timeout=300) as c:
        ready = c.get("/readyz")
        assert ready.status_code == 503 and "no index" in ready.json()["detail"]
        r = c.post("/v1/ask", json={"question": "How much is a parking permit?"})
        assert r.status_code == 503 and "/v1/index/refresh" in r.json()["detail"]
        assert c.get("/").status_code == 200  # the page is served even before an index
        assert c.get("/openapi.json").json()["paths"].keys() >= {
            "/v1/ask",
            "/v1/chat",
            "/v1/chat/completions",
            "/v1/models",
            "/v1/feedback",
            "/v1/index/refresh",
            "/v1/raft/regenerate",
            "/v1/jobs/{job_id}",
        }

        job = c.post("/v1/index/refresh", files={"files": ("parking.md", DOC.encode())}).json()
        deadline = time.monotonic() + 120
        while (state := c.get(f"/v1/jobs/{job['id']}").json())["state"] not in (
            "succeeded",
            "failed",
        ):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert state["state"] == "succeeded", state["error"]
        assert c.get("/readyz").json()["ready"] is True
        body = c.post("/v1/ask", json={"question": "How much is a parking permit?"}).json()
        assert body["chunks"][0]["source"] == "parking.md"
        assert body["adapter"] is None  # nothing promoted: the base model answers
