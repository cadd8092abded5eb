"""Two rounds of the improvement loop on the handbook, unattended, as an operator runs them.

Round 1 learns the handbook without three of its documents (and with its human train
questions). Between the rounds, 20 simulated users ask training-split questions through the
same ``RagService`` the API uses and rate the answers: thumbs up when the gold answer is in the
final answer, else thumbs down with the gold answer as their correction, stored exactly as
``POST /v1/feedback`` stores them. Round 2 adds the three documents and learns from that
feedback. Each round prints its time per stage, the validation accuracy of base+RAG, SFT and
SFT+DPO, grounding, declines on unanswerable questions, the forgetting probe, and whether the
gate promoted an adapter and why. ``bench/out/loop.{json,md}`` keep the figures.

Run (from the repository root)::

    HF_HUB_OFFLINE=1 .venv/bin/python bench/loop.py                      # the defaults
    HF_HUB_OFFLINE=1 .venv/bin/python bench/loop.py --max-steps 10       # a quick pass
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(ROOT))

from docent.hardware import describe, summary  # noqa: E402

HANDBOOK = ROOT / "examples" / "handbook"
QA_FILE = HANDBOOK / "qa.jsonl"
OUT_DIR = HERE / "out"
# Added in round 2: one each of markdown, html and docx.
HELD_BACK = ("keyboard-shortcuts.md", "help-templates-gallery.html",
             "admin-onboarding-checklist.docx")
FEEDBACK_ROWS = 20


def _pct(x: Any) -> str:
    return f"{100 * x:.1f}%" if isinstance(x, int | float) else "–"


def simulate_feedback(settings: Any, embedder: Any, dataset: str, rows: int,
                      seed: int) -> dict[str, int]:
    """``rows`` users ask training-split questions of the live system and rate its answers."""
    from eval.metrics import gold_contained
    from raft import show
    from raft.merge import serving_engine
    from retrieval import Retriever
    from serving.adapters import AdapterCatalog
    from serving.metrics import Metrics
    from serving.rag import RagService
    from serving.routes_answer import chunk_out
    from serving.store import open_serving_store

    folder = settings.workspace / "raft" / dataset
    seen: dict[str, str] = {}
    for record in show.load_examples(folder, "train"):
        meta = record["meta"]
        if meta.get("kind") == "oracle" and meta.get("answer"):
            seen.setdefault(meta["question"], meta["answer"])
    asked = sorted(seen.items())
    random.Random(seed).shuffle(asked)
    asked = asked[:rows]
    store = open_serving_store(settings, settings.workspace / "serving")
    retriever = Retriever(settings, embedder=embedder)
    engine = serving_engine(settings, serving=False)
    counts = {"up": 0, "down_corrected": 0}
    try:
        rag = RagService(settings, retriever, engine, AdapterCatalog(settings, engine), Metrics())
        for question, gold in asked:
            answer = asyncio.run(rag.answer(question))
            answer_id = store.save_answer(
                kind="ask", question=question, answer=answer.answer,
                reasoning=answer.reasoning, declined=answer.declined,
                citations=[c.as_dict() for c in answer.citations],
                chunks=[chunk_out(h) for h in answer.hits], model=answer.model,
                adapter=answer.adapter,
            )
            if not answer.declined and gold_contained(answer.answer, [gold]):
                store.add_feedback(answer_id, 1, None, "simulated user: right")
                counts["up"] += 1
            else:
                store.add_feedback(answer_id, -1, gold, "simulated user: corrected")
                counts["down_corrected"] += 1
    finally:
        engine.close()
        retriever.close()
        store.close()
    return counts


def round_row(record: Any) -> dict[str, Any]:
    scores = record.scores
    row = {
        "round": record.id,
        "state": record.state,
        "index_version": record.lineage.get("index_version"),
        "raft_set": record.lineage.get("raft_set"),
        "stage_seconds": {name: stage.seconds for name, stage in record.stages.items()},
        "minutes": round(sum(s.seconds for s in record.stages.values()) / 60, 1),
        "validation_questions": scores.get("validation_questions"),
        "base_rag": scores.get("base+rag"),
        "live": scores.get("live"),
        "probe_base": scores.get("probe_base"),
        "sft": scores.get("sft"),
        "dpo": scores.get("dpo"),
        "pairs": record.stages["pairs"].result if "pairs" in record.stages else None,
        "decision": record.decision,
    }
    return row


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| round | val. q | base+RAG | live | SFT | SFT+DPO | DPO − SFT | quotes found "
            "SFT/DPO | declined unanswerable base/SFT/DPO | probe base/SFT/DPO | pairs | "
            "promoted | minutes |")
    lines = [head, "|---|" + "---:|" * 10 + "---|---:|"]
    for r in rows:
        sft, dpo = r["sft"] or {}, r["dpo"] or {}
        gain = (f"{100 * (dpo['accuracy'] - sft['accuracy']):+.1f}"
                if sft and dpo else "–")
        declined = "/".join(_pct(x.get("declined_unanswerable")) for x in (
            r["base_rag"] or {}, sft, dpo))
        quotes = "/".join(_pct((x.get("validation") or {}).get("quotes_grounded"))
                          for x in (sft, dpo))
        decision = r["decision"] or {}
        promoted = decision.get("adapter") if decision.get("promote") else "no"
        lines.append(
            f"| {r['round']} | {r['validation_questions'] or '–'} | "
            f"{_pct((r['base_rag'] or {}).get('accuracy'))} | "
            f"{_pct((r['live'] or {}).get('accuracy'))} | {_pct(sft.get('accuracy'))} | "
            f"{_pct(dpo.get('accuracy'))} | {gain} | {quotes} | {declined} | "
            f"{_pct(r['probe_base'])}/{_pct(sft.get('probe'))}/{_pct(dpo.get('probe'))} | "
            f"{(r['pairs'] or {}).get('count', '–')} | {promoted} | {r['minutes']} |"
        )
    return "\n".join(lines)


def stage_table(rows: list[dict[str, Any]]) -> str:
    stages = list(dict.fromkeys(s for r in rows for s in r["stage_seconds"]))
    lines = ["| round | " + " | ".join(stages) + " |", "|---|" + "---:|" * len(stages)]
    for r in rows:
        lines.append(f"| {r['round']} | " + " | ".join(
            f"{r['stage_seconds'].get(s, 0) / 60:.1f}" for s in stages) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-steps", type=int, default=None,
                        help="SFT and DPO steps per round (default: the settings' epochs)")
    parser.add_argument("--feedback", type=int, default=FEEDBACK_ROWS,
                        help="simulated feedback rows between the rounds")
    parser.add_argument("--workspace", type=Path, help="keep the workspace here")
    args = parser.parse_args()

    from docent.loop import LoopRequest, run_loop
    from docent.settings import DocentSettings
    from ingest.embedder import Embedder

    workspace = args.workspace or Path(tempfile.mkdtemp(prefix="docent-loop-"))
    corpus = workspace.parent / f"{workspace.name}-corpus"
    shutil.rmtree(corpus, ignore_errors=True)
    shutil.copytree(HANDBOOK, corpus, ignore=shutil.ignore_patterns("qa.jsonl", *HELD_BACK))
    settings = DocentSettings(workspace=workspace / "ws")
    if args.max_steps:
        settings = settings.with_overrides(train_max_steps=args.max_steps,
                                           train_eval_steps=args.max_steps)
    embedder = Embedder()
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    feedback: dict[str, int] = {}
    try:
        request = LoopRequest(paths=[str(corpus)], qa_file=str(QA_FILE), dpo=True)
        first = run_loop(settings, request, embedder=embedder)
        rows.append(round_row(first))
        print(table(rows), flush=True)
        feedback = simulate_feedback(settings, embedder, first.lineage["raft_set"],
                                     args.feedback, settings.seed)
        print(f"simulated feedback: {feedback}", flush=True)
        for name in HELD_BACK:
            shutil.copy2(HANDBOOK / name, corpus / name)
        second = run_loop(settings, LoopRequest(paths=[str(corpus)], dpo=True),
                          embedder=embedder)
        rows.append(round_row(second))
    finally:
        if args.workspace is None:
            shutil.rmtree(workspace, ignore_errors=True)
        shutil.rmtree(corpus, ignore_errors=True)
    hardware = describe()
    report = {"hardware": hardware, "max_steps": args.max_steps, "feedback": feedback,
              "rounds": rows, "seconds": round(time.perf_counter() - started, 1)}
    OUT_DIR.mkdir(exist_ok=True)
    (OUT_DIR / "loop.json").write_text(json.dumps(report, indent=2, default=str))
    budget = f"{args.max_steps} steps" if args.max_steps else f"{settings.train_epochs:g} epoch"
    reasons = "\n".join(f"- {r['round']}: {(r['decision'] or {}).get('reason')}" for r in rows)
    text = (f"# Two loop rounds on the handbook ({budget} of SFT and DPO per round)\n\n"
            f"Machine: {summary(hardware)}. Total {report['seconds'] / 60:.1f} min. "
            f"Feedback between the rounds: {feedback}.\n\n{table(rows)}\n\n"
            f"Minutes per stage:\n\n{stage_table(rows)}\n\nGate:\n\n{reasons}\n")
    (OUT_DIR / "loop.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
