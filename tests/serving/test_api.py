"""The HTTP API against a real uvicorn server with the embedded model."""

from __future__ import annotations

from conftest import ADAPTER


def test_ask_answers_with_citations(live_server):
    with live_server.client() as c:
        r = c.post("/v1/ask", json={"question": "How long is an invitation link valid?"})
    assert r.status_code == 200, r.text
    body = r.json()
    print(body)
    assert body["id"].startswith("ans_")
    assert body["adapter"] == ADAPTER
    assert any(ch["source"] == "getting-started.md" for ch in body["chunks"])
