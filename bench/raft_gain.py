"""Does RAFT pay on the embedded 135M model? The whole path on the handbook in one run.

1. Index the handbook and build RAFT sets from the documents alone (rule-written questions,
   no QA file, no LLM; the human test questions are never trained on).
2. For each recipe, train a LoRA adapter for ``--steps`` steps, score it on the validation
   split's questions (answer accuracy, as ``docent tune`` does) and on the handbook's
   held-out test questions (40 answerable + 10 unanswerable): base, base+RAG, RAFT, RAFT+RAG.
3. Print one table row per recipe (the first recipe is the default one, the others are the
   ablations: each changes one lever) and write ``bench/out/raft_gain.{json,md}``.

Accuracy is the headline of ``docent eval``: the gold answer in the *final* answer (the
``<ANSWER>:`` line, or the first sentence of output without one).

Run (from the repository root)::

    HF_HUB_OFFLINE=1 .venv/bin/python bench/raft_gain.py                       # every recipe
    HF_HUB_OFFLINE=1 .venv/bin/python bench/raft_gain.py --recipes default     # the default only
    HF_HUB_OFFLINE=1 .venv/bin/python bench/raft_gain.py --recipes default,quote --steps 40
"""

from __future__ import annotations

import argparse
import json
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
# The levers a recipe may change, recorded for every row. The first recipe, "default", is
# Docent's defaults (docent/settings.py: run 8's recipe); each other one changes one lever.
LEVERS = ("raft_cot_format", "raft_p_oracle", "raft_distractors", "top_k", "train_lr",
          "train_batch_size", "train_rehearsal", "raft_refusal_related",
          "raft_refusal_fraction")
RECIPES: dict[str, dict[str, Any]] = {
    "default": {},
    "no_rehearsal": {"train_rehearsal": 0.0},
    "quote": {"raft_cot_format": "quote"},
    "reasoning": {"raft_cot_format": "reasoning"},
    "answer_first": {"raft_cot_format": "answer_first"},
    "related_refusals": {"raft_refusal_related": True, "raft_refusal_fraction": 0.15},
    "p0.8": {"raft_p_oracle": 0.8},
    "lr3e-4": {"train_lr": 3e-4},
    "k5": {"raft_distractors": 4, "top_k": 5},
}


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def folder_name(recipe: str) -> str:
    """The RAFT set's and adapter's name for a recipe: "+" is not allowed in them."""
    return recipe.replace("+", "-")


def run_recipe(recipe: str, settings: Any, steps: int | None, embedder: Any,
               full: bool) -> dict[str, Any]:
    from eval.runner import run_eval
    from eval.validation import prepare_validation, score_validation
    from raft.build import build_raft_set
    from raft.train import train_adapter

    name = folder_name(recipe)
    started = time.perf_counter()
    built = build_raft_set(settings, name=name, embedder=embedder)
    if steps is not None:
        settings = settings.with_overrides(train_max_steps=steps, train_eval_steps=steps)
    trained = train_adapter(settings, dataset=name, name=name)
    train_s = time.perf_counter() - started
    vset = prepare_validation(settings, name)
    val = score_validation(settings, vset, adapter=name, embedder=embedder)
    systems = ("base", "base+rag", "raft", "raft+rag") if full else ("base+rag", "raft+rag")
    test = run_eval(settings, QA_FILE, systems=systems, adapter=name, split="test",
                    embedder=embedder, forgetting=True)
    return {
        "recipe": recipe,
        "settings": {k: settings.model_dump()[k] for k in LEVERS},
        "examples": built.examples,
        "questions_accepted": built.questions_accepted,
        "questions_per_chunk": round(built.questions_accepted / max(built.chunks_total, 1), 2),
        "steps": trained.steps,
        "train_loss": [trained.train_loss_first, trained.train_loss_last],
        "train_tokens_per_s": trained.tokens_per_s,
        "validation": {s: {k: v for k, v in val[s].items()} for s in val},
        "validation_questions": vset.questions,
        "test": test.systems,
        "forgetting": test.forgetting,
        "seconds": round(time.perf_counter() - started, 1),
        "train_seconds": round(train_s, 1),
    }


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| recipe | val base+RAG | val RAFT+RAG | test base+RAG | test RAFT+RAG | gain | "
            "F1 base+RAG / RAFT+RAG | quotes in context | declined unanswerable | cited | "
            "forgetting base → tuned | train s |")
    lines = [head, "|---|" + "---:|" * 11]
    for r in rows:
        v, t, f = r["validation"], r["test"], r["forgetting"]
        gain = 100 * (t["raft+rag"]["accuracy"] - t["base+rag"]["accuracy"])
        lines.append(
            f"| {r['recipe']} | {_pct(v['base+rag']['accuracy'])} | "
            f"{_pct(v['raft+rag']['accuracy'])} | {_pct(t['base+rag']['accuracy'])} | "
            f"{_pct(t['raft+rag']['accuracy'])} | {gain:+.1f} | "
            f"{_pct(t['base+rag']['f1'])} / {_pct(t['raft+rag']['f1'])} | "
            f"{_pct(t['raft+rag']['quotes_grounded'])} | "
            f"{_pct(t['raft+rag']['declined_unanswerable'])} | "
            f"{_pct(t['raft+rag']['answers_with_citation'])} | "
            f"{_pct(f.get('base'))} → {_pct(f.get('raft'))} | {r['train_seconds']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", default=",".join(RECIPES),
                        help=f"comma-separated, from {', '.join(RECIPES)}; the first is "
                        "the one the others are compared with")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps per recipe (default: the settings' epochs)")
    parser.add_argument("--workspace", type=Path, help="reuse (or keep) this workspace")
    args = parser.parse_args()
    names = [n.strip() for n in args.recipes.split(",") if n.strip()]
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        parser.error(f"unknown recipe(s) {unknown}: choose from {', '.join(RECIPES)}")

    from docent.settings import DocentSettings
    from ingest.embedder import Embedder
    from ingest.pipeline import refresh_index

    workspace = args.workspace or Path(tempfile.mkdtemp(prefix="docent-raft-gain-"))
    embedder = Embedder()
    started = time.perf_counter()
    base = DocentSettings(workspace=workspace)
    if not (workspace / "index").exists():
        refresh_index([HANDBOOK], base, embedder=embedder)
    rows = []
    try:
        for i, name in enumerate(names):
            settings = base.with_overrides(**RECIPES[name])
            for old in (workspace / "raft" / folder_name(name),
                        workspace / "adapters" / folder_name(name)):
                shutil.rmtree(old, ignore_errors=True)
            rows.append(run_recipe(name, settings, args.steps, embedder, full=i == 0))
            print(table(rows), flush=True)
    finally:
        if args.workspace is None:
            shutil.rmtree(workspace, ignore_errors=True)
    hardware = describe()
    report = {
        "hardware": hardware,
        "steps": args.steps,
        "default_recipe": {k: base.model_dump()[k] for k in LEVERS},
        "recipes": rows,
        "seconds": round(time.perf_counter() - started, 1),
    }
    OUT_DIR.mkdir(exist_ok=True)
    (OUT_DIR / "raft_gain.json").write_text(json.dumps(report, indent=2))
    budget = f"{args.steps} steps" if args.steps else f"{base.train_epochs:g} epoch(s)"
    text = (f"# RAFT gain on the handbook ({budget} per recipe)\n\n"
            f"Machine: {summary(hardware)}. Total {report['seconds'] / 60:.1f} min.\n\n"
            f"{table(rows)}\n")
    (OUT_DIR / "raft_gain.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
