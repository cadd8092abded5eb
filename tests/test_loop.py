"""The improvement loop, for real: a Docent server on 127.0.0.1 (transformers engine, the
embedded SmolLM2) runs two rounds on a small corpus through ``POST /v1/loop`` (a few chunks,
two training steps), then the CLI's loop is SIGKILLed mid-training and resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from docent.settings import DocentSettings

from conftest import (
    ADMIN_KEY,
    NO_MODEL_RECIPE,
    ORBIT_FACTS,
    ORBIT_QA,
    ROOT,
    USER_KEY,
    free_port,
    serve_in_thread,
    wait_for_job,
    write_corpus,
    write_qa,
)

pytestmark = pytest.mark.slow

ROUND_TIMEOUT_S = 900  # a round takes about a minute and a half on 2 cores
UNANSWERABLE = ["Who founded the Orbit company?"]
NEW_DOC = {"garage.md": "# Garage\n\nThe Orbit garage closes at 19:00. Parking costs 2 EUR."}


def write_loop_qa(path: Path) -> Path:
    """The Orbit train questions, and one the documents do not answer."""
    write_qa(path, ORBIT_QA)
    with path.open("a") as out:
        for i, question in enumerate(UNANSWERABLE):
            out.write(json.dumps({"id": f"u{i}", "question": question, "answer": "",
                                  "answerable": False}) + "\n")
    return path


def tiny_loop_settings(workspace: Path, **overrides: object) -> DocentSettings:
    """Two training steps, three validation and probe questions of short answers: a round in
    about a minute on two cores."""
    return DocentSettings(
        workspace=workspace,
        raft_distractors=2,
        top_k=3,
        raft_refusal_fraction=0.0,
        train_max_steps=2,
        train_eval_steps=1,
        train_batch_size=2,
        train_max_length=1024,
        tune_val_questions=3,
        validation_max_tokens=32,
        probe_questions=3,
        dpo_max_pairs=4,
        **NO_MODEL_RECIPE,
        **overrides,  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module")
def loop_server(tmp_path_factory, embedder, hf_serving_engine):
    from serving.app import create_app

    root = tmp_path_factory.mktemp("loop")
    corpus = write_corpus(root / "docs", ORBIT_FACTS)
    qa = write_loop_qa(root / "qa.jsonl")
    settings = tiny_loop_settings(
        root / "ws",
        api_keys=f"{USER_KEY},{ADMIN_KEY}:admin",
        refresh_roots=[root],
        answer_max_tokens=32,
        queue_timeout_s=600,
    )
    port = free_port()
    app = create_app(settings, engine=hf_serving_engine, embedder=embedder)
    with serve_in_thread(app, port) as url:
        yield url, settings, corpus, qa


def _client(url: str, key: str = ADMIN_KEY) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=300)


def _ask(url: str, question: str) -> dict:
    with _client(url, USER_KEY) as c:
        reply = c.post("/v1/ask", json={"question": question, "max_tokens": 32})
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_two_rounds_over_http_lineage_gating_and_the_live_switch(loop_server):
    from raft.adapters import AdapterRegistry

    url, settings, corpus, qa = loop_server
    registry = AdapterRegistry(settings.workspace / "adapters")
    with _client(url) as admin:
        assert _ask_status(url, {"paths": [str(corpus)]}, USER_KEY) == 403
        assert admin.post("/v1/loop", json={"paths": ["/no/such/folder"]}).status_code == 400
        assert admin.post("/v1/loop", json={"train": {"momentum": 1}}).status_code == 422

        # Round 1: index, RAFT set, SFT, DPO, scores. Two steps rarely beat base+RAG, so the
        # operator forces it live here, to see the server switch; round 2 is gated.
        started = admin.post(
            "/v1/loop",
            json={"paths": [str(corpus)], "qa_file": str(qa), "force": True, "dpo": True},
        )
        assert started.status_code == 202, started.text
        second = admin.post("/v1/loop", json={"paths": [str(corpus)]})
        assert second.status_code == 409 and "already running" in second.json()["detail"]
        job = wait_for_job(admin, started.json()["id"], ROUND_TIMEOUT_S)
        assert job["state"] == "succeeded", job["error"]
        assert job["progress"]["loop"] == {"done": 9, "total": 9}
        first = job["result"]
        assert first["id"] == "r0001" and first["state"] == "succeeded"
        lineage = first["lineage"]
        assert lineage["index_version"] and lineage["raft_set"] == "loop-r0001"
        assert len(lineage["dataset_hash"]) == 64 and lineage["sft"] == "loop-r0001-sft"
        assert lineage["live_before"] is None
        assert all(s["state"] in ("done", "skipped") for s in first["stages"].values())
        assert set(first["stages"]) == {
            "ingest", "raft", "sft", "score_sft", "pairs", "dpo", "score_dpo", "gate", "promote"
        }
        scores = first["scores"]
        assert 0 <= scores["sft"]["accuracy"] <= 1 and 0 <= scores["probe_base"] <= 1
        assert scores["validation_questions"] >= 2
        assert "declined_unanswerable" in scores["sft"]
        pairs = first["stages"]["pairs"]["result"]
        assert pairs["count"] == sum(pairs["by_origin"].values())
        if pairs["count"]:  # the 2-step adapter gets training questions wrong: DPO trains
            assert lineage["dpo"] == "loop-r0001-dpo" and "dpo" in scores
            assert registry.get("loop-r0001-dpo").metadata["parent"] == "loop-r0001-sft"
        decision = first["decision"]
        assert decision["promote"] and decision["adapter"] in (lineage["sft"], lineage.get("dpo"))
        assert decision["reason"]
        live = decision["adapter"]
        assert registry.promoted().name == live == lineage["promoted"]
        assert _ask(url, "When does the Orbit help desk open?")["adapter"] == live

        # Round 2: a new document and a user's correction; training at an absurd learning rate
        # makes an adapter that answers worse, which the gate must keep out.
        write_corpus(corpus, NEW_DOC)
        answer = _ask(url, "When does the Orbit help desk open?")
        with _client(url, USER_KEY) as user:
            rated = user.post("/v1/feedback", json={
                "answer_id": answer["id"], "rating": -1, "correction": "08:30"})
        assert rated.status_code == 200
        job = wait_for_job(admin, admin.post("/v1/loop", json={
            "paths": [str(corpus)], "dpo": False, "train": {"lr": 1.0, "max_steps": 2}
        }).json()["id"], ROUND_TIMEOUT_S)
        assert job["state"] == "succeeded", job["error"]
        second_round = job["result"]
        assert second_round["id"] == "r0002"
        assert second_round["stages"]["ingest"]["result"]["added"] >= 1
        built = second_round["stages"]["raft"]["result"]
        assert built["chunks_reused"] > 0 and built["chunks_generated"] >= 1  # only the new doc
        assert second_round["lineage"]["feedback_rows"] == 1
        assert second_round["stages"]["pairs"]["state"] == "skipped"
        bad = second_round["decision"]
        assert not bad["promote"] and "stays live" in bad["reason"]
        assert bad["candidates"]["sft"]["candidate"] <= bad["candidates"]["sft"]["base_rag"] or (
            bad["candidates"]["sft"]["candidate"]
            < (bad["candidates"]["sft"]["promoted"] or 0) + settings.promote_margin
        )
        assert second_round["lineage"]["promoted"] is None
        assert registry.promoted().name == live
        assert _ask(url, "When does the Orbit help desk open?")["adapter"] == live

        # Nothing new: the round stops after the refresh, without training.
        again = admin.post("/v1/loop", json={"paths": [str(corpus)]})
        job = wait_for_job(admin, again.json()["id"], ROUND_TIMEOUT_S)
        unchanged = job["result"]
        assert unchanged["state"] == "unchanged"
        assert unchanged["stages"]["sft"]["state"] == "skipped"

        history = admin.get("/v1/loop/history").json()["rounds"]
        assert [r["id"] for r in history] == ["r0001", "r0002", "r0003"]
        assert admin.get("/v1/loop/r0002").json()["decision"] == bad
        assert admin.get("/v1/loop/r0099").status_code == 404

    from docent.cli import app

    runner = CliRunner()
    shown = runner.invoke(app, ["-w", str(settings.workspace), "loop", "history", "--json"])
    assert shown.exit_code == 0, shown.output
    rounds = json.loads(shown.output)["rounds"]
    assert [r["lineage"].get("promoted") for r in rounds] == [live, None, None]
    table = runner.invoke(app, ["-w", str(settings.workspace), "loop", "history"])
    assert table.exit_code == 0 and "r0003 unchanged" in table.output
    assert "promoted despite the gate" in table.output and "not promoted" in table.output
    missing = runner.invoke(app, ["-w", str(settings.workspace), "loop", "show", "r0042"])
    assert missing.exit_code == 1 and "no loop round 'r0042'" in missing.output


def _ask_status(url: str, body: dict, key: str) -> int:
    with _client(url, key) as c:
        return c.post("/v1/loop", json=body).status_code


def test_one_loop_at_a_time_per_workspace(tmp_path):
    from docent.lineage import LoopBusyError
    from docent.loop import LoopRequest, loop_store, run_loop

    settings = tiny_loop_settings(tmp_path / "ws")
    store = loop_store(settings)
    with store.lock():
        assert store.busy()
        with pytest.raises(LoopBusyError, match="already running"):
            run_loop(settings, LoopRequest(paths=[str(tmp_path)]))
    assert not store.busy()
    with pytest.raises(Exception, match="unknown training option"):
        LoopRequest(train={"momentum": 0.9})


def test_a_loop_killed_mid_training_resumes_where_it_stopped(tmp_path):
    """SIGKILL during SFT; the same command again reuses the index and the RAFT set and
    resumes training from its checkpoint."""
    corpus = write_corpus(tmp_path / "docs", ORBIT_FACTS)
    qa = write_loop_qa(tmp_path / "qa.jsonl")
    ws = tmp_path / "ws"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "DOCENT_WORKSPACE": str(ws),
        "DOCENT_ENGINE": "hf",
        "DOCENT_RAFT_COT_FORMAT": "reasoning",
        "DOCENT_TRAIN_REHEARSAL": "0",
        "DOCENT_RAFT_REFUSAL_FRACTION": "0",
        "DOCENT_TRAIN_MAX_STEPS": "3",
        "DOCENT_TRAIN_EVAL_STEPS": "1",
        "DOCENT_TRAIN_BATCH_SIZE": "2",
        "DOCENT_TRAIN_MAX_LENGTH": "1024",
        "DOCENT_TUNE_VAL_QUESTIONS": "2",
        "DOCENT_VALIDATION_MAX_TOKENS": "24",
        "DOCENT_PROBE_QUESTIONS": "2",
        "DOCENT_LOOP_DPO": "false",
    }
    command = [sys.executable, "-m", "docent.cli", "loop", "run", str(corpus),
               "--qa-file", str(qa)]
    record = ws / "loop" / "r0001" / "round.json"
    checkpoint = ws / "adapters" / ".runs" / "loop-r0001-sft" / "checkpoint-1"
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    try:
        while not (checkpoint / "trainer_state.json").exists():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "training never wrote its first checkpoint"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    cut = json.loads(record.read_text())
    assert cut["state"] == "running" and cut["stages"]["sft"]["state"] == "running"

    done = subprocess.run(command + ["--json"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    final = json.loads(record.read_text())
    assert final["state"] == "succeeded" and final["id"] == "r0001"
    stages = final["stages"]
    assert stages["ingest"]["attempts"] == 1 and stages["raft"]["attempts"] == 1
    assert stages["sft"]["attempts"] == 2 and "resumed from" in stages["sft"]["note"]
    assert stages["sft"]["result"]["steps"] == 3
    assert stages["pairs"]["state"] == stages["dpo"]["state"] == "skipped"
    assert final["decision"]["reason"]
