"""Shared fixtures. Models are loaded once per session; nothing is fetched from a hub."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from docent.settings import DocentSettings  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
HANDBOOK = ROOT / "examples" / "handbook"


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
