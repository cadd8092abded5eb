"""The HTTP API against a real uvicorn server with the embedded model (see ``live_server``)."""

from __future__ import annotations

import json

import pytest

from conftest import ADAPTER, ADMIN_KEY, USER_KEY, sse_events

INVITE = "How long is an invitation link to join a workspace valid?"


def test_ask_answers_from_the_documents_with_the_promoted_adapter(live_server):
    with live_server.client() as c:
        r = c.post("/v1/ask", json={"question": INVITE})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("ans_")
    assert body["adapter"] == ADAPTER  # the promoted adapter answers by default
    assert body["chunks"][0]["source"] == "getting-started.md"
    assert len(body["chunks"]) == live_server.settings.top_k
    assert body["answer"] and body["usage"]["completion_tokens"] > 0
    assert body["usage"]["completion_tokens"] <= live_server.settings.answer_max_tokens
    assert set(body["timings"]) >= {"retrieval_ms", "generation_ms", "total_ms"}
    for citation in body["citations"]:  # any citation points into a retrieved chunk
        chunk = body["chunks"][citation["document"] - 1]
        assert citation["chunk_id"] == chunk["chunk_id"]


def test_a_request_can_pick_the_base_model_or_another_adapter(live_server):
    with live_server.client() as c:
        tuned = c.post("/v1/ask", json={"question": INVITE}).json()
        base = c.post("/v1/ask", json={"question": INVITE, "adapter": "base"}).json()
        named = c.post("/v1/ask", json={"question": INVITE, "adapter": ADAPTER}).json()
        unknown = c.post("/v1/ask", json={"question": INVITE, "adapter": "nope"})
    assert base["adapter"] is None and named["adapter"] == ADAPTER
    # Greedy: the same adapter gives the same text; the (random) LoRA visibly changes it.
    assert named["answer"] == tuned["answer"]
    assert (base["answer"], base["reasoning"]) != (tuned["answer"], tuned["reasoning"])
    assert unknown.status_code == 404 and ADAPTER in unknown.json()["detail"]


def test_ask_streams_retrieval_text_then_the_answer(live_server):
    with live_server.client() as c:
        r = c.post("/v1/ask", json={"question": INVITE, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    kinds = [k for k, _ in events]
    assert kinds[0] == "retrieval" and kinds[-1] == "answer"
    assert kinds.count("delta") >= 1
    assert events[0][1]["chunks"][0]["source"] == "getting-started.md"
    final = events[-1][1]
    assert final["id"].startswith("ans_") and final["answer"]


def test_off_topic_questions_are_declined_without_generating(live_server):
    with live_server.client() as c:
        body = c.post("/v1/ask", json={"question": "What is the capital of France?"}).json()
    assert body["declined"] is True
    assert "don't know" in body["answer"]
    assert body["usage"]["completion_tokens"] == 0  # the model was not asked
    assert body["citations"] == []


def test_chat_keeps_history_and_retrieves_with_the_conversation(live_server):
    with live_server.client() as c:
        first = c.post(
            "/v1/chat",
            json={"message": "How do I invite people to my workspace?", "mode": "support"},
        ).json()
        session = first["session_id"]
        assert session
        # The follow-up names nothing: only the conversation says what "it" is.
        second = c.post(
            "/v1/chat",
            json={
                "session_id": session,
                "message": "How long does it stay valid?",
                "mode": "tutor",
            },
        ).json()
        history = c.get(f"/v1/chat/{session}").json()["messages"]
        alone = c.post("/v1/ask", json={"question": "How long does it stay valid?"}).json()
    assert second["session_id"] == session
    assert "getting-started.md" in [ch["source"] for ch in second["chunks"][:2]]
    assert [ch["chunk_id"] for ch in second["chunks"]] != [ch["chunk_id"] for ch in alone["chunks"]]
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    assert history[2]["content"] == "How long does it stay valid?"
    assert history[3]["answer_id"] == second["id"]


def test_openai_client_works_unchanged(live_server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{live_server.url}/v1", api_key=USER_KEY, max_retries=0)
    ids = [m.id for m in client.models.list().data]
    assert ids[:2] == ["docent", "docent:base"] and f"docent:{ADAPTER}" in ids
    messages = [
        {"role": "system", "content": "You help Quillfeather customers."},
        {"role": "user", "content": INVITE},
    ]
    done = client.chat.completions.create(model="docent", messages=messages, temperature=0)
    content = done.choices[0].message.content
    assert content and done.choices[0].finish_reason in ("stop", "length")
    assert done.usage.completion_tokens > 0
    extra = done.model_extra["docent"]
    assert extra["answer_id"].startswith("ans_") and extra["adapter"] == ADAPTER

    stream = client.chat.completions.create(
        model="docent",
        messages=messages,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, usage = [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        usage = chunk.usage or usage
    assert "".join(pieces) == content  # streaming and not give the same text
    assert usage is not None and usage.completion_tokens == done.usage.completion_tokens

    base = client.chat.completions.create(
        model="docent:base", messages=messages, extra_body={"docent": {"include_reasoning": True}}
    )
    assert base.model_extra["docent"]["adapter"] is None
    missing = client.with_options(max_retries=0)
    from openai import NotFoundError

    with pytest.raises(NotFoundError):
        missing.chat.completions.create(model="gpt-4o", messages=messages)


def test_feedback_is_stored_and_exported_for_the_next_raft_set(live_server):
    with live_server.client() as c:
        answer = c.post("/v1/ask", json={"question": INVITE}).json()
        r = c.post(
            "/v1/feedback",
            json={"answer_id": answer["id"], "rating": -1, "correction": "72 hours"},
        )
        assert r.status_code == 200 and r.json()["stored"] is True
        assert c.get("/v1/feedback/export").status_code == 403  # admin only
        missing = c.post("/v1/feedback", json={"answer_id": "ans_nope", "rating": 1})
        assert missing.status_code == 404
    with live_server.admin() as admin:
        rows = [json.loads(x) for x in admin.get("/v1/feedback/export").text.splitlines()]
    row = next(r for r in rows if r["answer"] == "72 hours")
    assert row["question"] == INVITE and row["split"] == "train"
    assert row["source"] == "getting-started.md" and "72 hours" in row["evidence"]


def test_auth_scopes(live_server):
    with live_server.client(key=None) as anon:
        assert anon.get("/healthz").status_code == 200  # probes need no key
        r = anon.post("/v1/ask", json={"question": INVITE})
        assert r.status_code == 401 and "API key" in r.json()["detail"]
        assert anon.get("/metrics").status_code == 401
        assert anon.get("/v1/models").status_code == 401
    with live_server.client(key="wrong-key-000000") as bad:
        assert bad.post("/v1/ask", json={"question": INVITE}).status_code == 401
    with live_server.client() as user:
        assert user.post("/v1/index/refresh", json={"paths": ["/tmp"]}).status_code == 403
        assert user.post("/v1/raft/regenerate", json={}).status_code == 403
        assert user.get("/v1/jobs").status_code == 403
        metrics = user.get("/metrics")
        assert metrics.status_code == 200 and "docent_requests_total" in metrics.text
        assert 'route="/v1/ask"' in metrics.text  # route templates, not raw paths
        for series in (
            "docent_engine_queue",
            "docent_tokens_total",
            "docent_generation_seconds",
            "docent_retrieval_seconds",
            "docent_time_to_first_token_seconds",
        ):
            assert series in metrics.text
    with live_server.client(key=None) as c:
        r = c.post("/v1/ask", json={"question": INVITE}, headers={"X-API-Key": ADMIN_KEY})
        assert r.status_code == 200


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        ({"question": ""}, 422, "question"),
        ({"question": "   "}, 422, "empty"),
        ({"question": "x" * 2001}, 422, "DOCENT_MAX_QUESTION_CHARS"),
        ({"question": "hi", "k": 0}, 422, "k"),
        ({"question": "hi", "k": 21}, 422, "DOCENT_MAX_K"),
        ({"question": "hi", "max_tokens": 10_000}, 422, "DOCENT_ANSWER_MAX_TOKENS"),
        ({"question": "hi", "filters": {"source": 3}}, 422, "source"),
        ({"question": "hi", "colour": "red"}, 422, "colour"),
        ({"question": ["a"]}, 422, "question"),
    ],
)
def test_bad_questions_get_clear_4xx(live_server, body, status, says):
    with live_server.client() as c:
        r = c.post("/v1/ask", json=body)
    assert r.status_code == status, r.text
    assert says in r.json()["detail"]


def test_bad_bodies_and_ids_get_clear_4xx(live_server):
    with live_server.client() as c:
        big = c.post("/v1/ask", json={"question": "x" * 70_000})
        assert big.status_code == 413 and "limit" in big.json()["detail"]
        not_json = c.post(
            "/v1/ask", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert not_json.status_code == 422
        assert c.post("/v1/chat", json={"message": "hi", "session_id": "../etc"}).status_code == 400
        assert c.post("/v1/chat", json={"message": "hi", "mode": "poet"}).status_code == 422
        assert c.get("/v1/chat/s_does_not_exist").status_code == 404
        assert c.post("/v1/feedback", json={"answer_id": "x", "rating": 5}).status_code == 422
        filtered = c.post(
            "/v1/ask", json={"question": INVITE, "filters": {"source": "no-such-file.md"}}
        )
        assert filtered.status_code == 200 and filtered.json()["declined"] is True
    with live_server.admin() as admin:
        assert admin.get("/v1/jobs/job_nope").status_code == 404
        r = admin.post("/v1/index/refresh", json={"paths": ["/no/such/folder"]})
        assert r.status_code == 400 and "no such file" in r.json()["detail"]
        r = admin.post("/v1/index/refresh", files={"files": ("evil.exe", b"MZ")})
        assert r.status_code == 415
        r = admin.post("/v1/index/refresh", files={"files": ("../x.md", b"# x")})
        assert r.status_code == 422
        r = admin.post("/v1/index/refresh", files={"files": ("big.md", b"x" * (1024 * 1024 + 1))})
        assert r.status_code == 413


def test_readyz_reports_the_index_and_engine(live_server):
    with live_server.client(key=None) as c:
        body = c.get("/readyz").json()
    assert body["ready"] is True and body["chunks"] > 50
    assert body["engine"] == "hf" and body["adapter"] == ADAPTER


def test_uploads_are_indexed_by_a_background_job(live_server):
    doc = (
        "# Lantern Loft\n\nThe Lantern Loft is the quiet room on the fourth floor of the "
        "Brindlewood office. It can be booked for at most 90 minutes at a time.\n"
    )
    with live_server.admin() as admin:
        r = admin.post(
            "/v1/index/refresh",
            files={"files": ("lantern-loft.md", doc.encode())},
            data={"collection": "office"},
        )
        assert r.status_code == 202, r.text
        job = live_server.wait_job(r.json()["id"])
        assert job["state"] == "succeeded", job
        assert job["result"]["added"] >= 1 and job["progress"]
        listed = admin.get("/v1/jobs").json()["jobs"]
        assert listed[0]["id"] == job["id"]
    with live_server.client() as c:
        body = c.post(
            "/v1/ask",
            json={
                "question": "How long can the Lantern Loft be booked?",
                "filters": {"collection": "office"},
            },
        ).json()
    assert body["chunks"][0]["source"] == "lantern-loft.md"


def test_concurrent_questions_during_a_refresh_all_succeed(live_server):
    import asyncio

    import httpx

    corpus = live_server.corpus
    for n in range(12):
        (corpus / f"note-{n}.md").write_text(
            f"# Note {n}\n\nThe Brindlewood duty roster entry {n} says desk {n} opens at "
            f"{7 + n % 5}:00 and closes at {17 + n % 3}:00.\n" * 3
        )
    with live_server.client(key=None) as c:
        before = c.get("/readyz").json()["index_version"]

    async def run() -> tuple[list[int], dict]:
        headers = {"Authorization": f"Bearer {USER_KEY}"}
        async with httpx.AsyncClient(base_url=live_server.url, timeout=600) as client:
            r = await client.post(
                "/v1/index/refresh",
                json={"paths": [str(corpus)], "collection": "notes"},
                headers={"Authorization": f"Bearer {ADMIN_KEY}"},
            )
            assert r.status_code == 202
            asks = [
                client.post("/v1/ask", json={"question": INVITE, "max_tokens": 8}, headers=headers)
                for _ in range(20)
            ]
            responses = await asyncio.gather(*asks)
            job = await asyncio.to_thread(live_server.wait_job, r.json()["id"])
        return [x.status_code for x in responses], job

    statuses, job = asyncio.run(run())
    assert statuses == [200] * 20
    assert job["state"] == "succeeded" and job["result"]["published"]
    with live_server.client(key=None) as c:
        after = c.get("/readyz").json()["index_version"]
    assert after != before and after == job["result"]["version"]
    with live_server.client() as c:
        hits = c.post(
            "/v1/ask", json={"question": "When does desk 3 open?", "max_tokens": 4}
        ).json()["chunks"]
    assert hits[0]["source"].startswith("note-")


@pytest.mark.slow
def test_regenerate_builds_a_raft_set_with_the_corrections(live_server):
    from conftest import HANDBOOK

    with live_server.client() as c:
        answer = c.post("/v1/ask", json={"question": INVITE, "max_tokens": 4}).json()
        c.post(
            "/v1/feedback",
            json={"answer_id": answer["id"], "rating": -1, "correction": "72 hours"},
        )
    with live_server.admin() as admin:
        r = admin.post(
            "/v1/raft/regenerate",
            json={"limit": 2, "qa_file": str(HANDBOOK / "qa.jsonl"), "name": "from-api"},
        )
        assert r.status_code == 202
        job = live_server.wait_job(r.json()["id"])
    assert job["state"] == "succeeded", job["error"]
    result = job["result"]
    assert result["name"] == "from-api" and sum(result["examples"].values()) > 0
    # 92 train questions in qa.jsonl, plus the reviewer's correction.
    assert result["human_questions"] >= 93
    assert (live_server.settings.workspace / "raft" / "from-api" / "manifest.json").exists()
