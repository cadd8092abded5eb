"""RAFT build throughput: batched teacher generation vs one request at a time, same run.

Ingests ``examples/handbook`` once into a temporary workspace, then runs
``raft.build.build_raft_set`` twice over the same ``--limit`` chunks, each with an empty
generation cache: once with the engine's batching (``raft_batch_chunks`` chunks per step, all
their questions in one ``generate`` call), once through a wrapper that hands the engine one
request at a time (what a naive loop over the teacher does). The same teacher model instance
serves both. Reports chunks, proposed questions and accepted examples per minute, generated
tokens per second, and the batched / one-at-a-time ratio.

Run (from the repository root)::

    HF_HUB_OFFLINE=1 .venv/bin/python bench/raft_build.py               # transformers, ~5 min
    HF_HUB_OFFLINE=1 .venv/bin/python bench/raft_build.py --engine vllm # vLLM CPU

Prints a Markdown table and writes ``bench/out/raft_build.json``; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(ROOT))

from docent.engine import ChatRequest, Completion, Engine, build_engine  # noqa: E402
from docent.hardware import auto_dtype, describe, summary  # noqa: E402
from docent.settings import DocentSettings  # noqa: E402
from ingest.embedder import Embedder  # noqa: E402
from ingest.pipeline import refresh_index  # noqa: E402
from raft.build import build_raft_set  # noqa: E402


class Metered(Engine):
    """Counts generated tokens; with ``one_at_a_time`` sends requests singly."""

    def __init__(self, inner: Engine, one_at_a_time: bool) -> None:
        self.inner, self.kind, self.model = inner, inner.kind, inner.model
        self.one_at_a_time = one_at_a_time
        self.tokens = 0

    def generate(self, requests: Sequence[ChatRequest], progress=None) -> list[Completion]:
        if self.one_at_a_time:
            out = [self.inner.generate([r])[0] for r in requests]
        else:
            out = self.inner.generate(requests)
        self.tokens += sum(c.completion_tokens for c in out)
        return out


def run(args: argparse.Namespace) -> dict[str, object]:
    tmp = Path(tempfile.mkdtemp(prefix="docent-bench-raft-"))
    try:
        embedder = Embedder()
        base = DocentSettings(
            workspace=tmp / "base", engine=args.engine, raft_batch_chunks=args.batch_chunks
        )
        refresh_index([ROOT / "examples" / "handbook"], base, embedder=embedder)
        teacher = build_engine(base)
        rows = {}
        for label, single in (("batched", False), ("one at a time", True)):
            ws = tmp / label.replace(" ", "-")
            shutil.copytree(base.workspace / "index", ws / "index")
            engine = Metered(teacher, single)
            started = time.perf_counter()
            report = build_raft_set(
                base.with_overrides(workspace=ws),
                limit=args.limit,
                engine=engine,
                embedder=embedder,
            )
            minutes = (time.perf_counter() - started) / 60
            rows[label] = {
                "seconds": round(minutes * 60, 1),
                "chunks_per_min": round(report.chunks_generated / minutes, 1),
                "questions_per_min": round(report.questions_generated / minutes, 1),
                "examples_per_min": round(sum(report.examples.values()) / minutes, 2),
                "gen_tokens_per_s": round(engine.tokens / (minutes * 60), 1),
                "accepted": report.questions_accepted,
                "rejections": report.rejections,
            }
            print(f"{label}: {rows[label]}", flush=True)
        teacher.close()
        ratio = rows["batched"]["chunks_per_min"] / rows["one at a time"]["chunks_per_min"]
        return {
            "engine": teacher.kind,
            "dtype": auto_dtype(),
            "machine": describe(),
            "limit": args.limit,
            "rows": rows,
            "batched_over_single": round(ratio, 2),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=24, help="chunks to generate from")
    parser.add_argument("--engine", default="hf", choices=["hf", "vllm"])
    parser.add_argument("--batch-chunks", type=int, default=16)
    args = parser.parse_args()
    result = run(args)
    print(f"\n### RAFT build, {result['engine']} teacher ({result['dtype']}), {args.limit} chunks, "
          f"{summary(result['machine'])}\n")
    print("| mode | seconds | chunks/min | questions/min | examples/min | gen tokens/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, row in result["rows"].items():  # type: ignore[union-attr]
        print(
            f"| {label} | {row['seconds']} | {row['chunks_per_min']} | "
            f"{row['questions_per_min']} | {row['examples_per_min']} | "
            f"{row['gen_tokens_per_s']} |"
        )
    print(f"\nbatched / one at a time: {result['batched_over_single']}x")
    out = HERE / "out"
    out.mkdir(exist_ok=True)
    (out / "raft_build.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
