"""DPO variants on top of one SFT adapter, scored the way the loop's gate scores them.

The README's "DPO ablation" table comes from this: the SFT adapter answers its RAFT set's
training examples once (the automatic pairs, kept in ``<workspace>/preferences/``), then each
variant (loss, learning rate, which kinds of pairs) trains its own DPO adapter from those pairs
and is scored on the gate's validation questions, the handbook's test split (with its
unanswerable questions) and the forgetting probe. Answers are cached per adapter, so a re-run
after a crash or with one more variant redoes only what is new.
``bench/out/dpo_ablation.{json,md}`` keep the figures.

Run (from the repository root), on a workspace whose promoted or named SFT adapter was trained
on the handbook (``docent run`` or ``make demo`` makes one)::

    HF_HUB_OFFLINE=1 .venv/bin/python bench/dpo_ablation.py --workspace ws --sft default
    HF_HUB_OFFLINE=1 .venv/bin/python bench/dpo_ablation.py --workspace ws \\
        --variant '{"name": "lr2e-4", "dpo_lr": 2e-4}'
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(ROOT))

from docent.hardware import describe, summary  # noqa: E402

QA_FILE = ROOT / "examples" / "handbook" / "qa.jsonl"
OUT_DIR = HERE / "out"
ALL_KINDS = ["wrong", "ungrounded", "refusal"]
# The variants of the README's table; each is a name plus settings overrides.
VARIANTS: list[dict[str, Any]] = [
    {"name": "dpo-lr2e-4-all", "dpo_lr": 2e-4, "dpo_auto_kinds": ALL_KINDS},
    {"name": "apo-lr2e-4-all", "dpo_lr": 2e-4, "dpo_auto_kinds": ALL_KINDS,
     "dpo_loss": "apo_zero"},
    {"name": "dpo-lr2e-4", "dpo_lr": 2e-4},
    {"name": "dpo-lr5e-5", "dpo_lr": 5e-5},
]


def _pct(x: Any) -> str:
    return f"{100 * x:.1f}%" if isinstance(x, int | float) else "–"


def _self_declined(settings: Any, adapter: str, vset: Any) -> int:
    """How many validation answers the model itself wrote as a decline (not the quote
    guard's): displacement towards "the documents do not say" shows here first. The answers
    are the gate's, from the answer cache."""
    from docent.prompts import parse_answer
    from eval.runner import run_eval

    result = run_eval(settings, vset.qa_file, systems=("raft+rag",), adapter=adapter,
                      split="validation", forgetting=False, max_tokens=vset.max_tokens)
    return sum(parse_answer(p["raw"]).declined for p in result.predictions)


def score(settings: Any, adapter: str, vset: Any) -> dict[str, Any]:
    from eval.promotion import judge_candidate
    from eval.runner import run_eval, run_probe

    gate = judge_candidate(settings, adapter, vset)
    test = run_eval(settings, QA_FILE, systems=("raft+rag",), adapter=adapter, split="test",
                    forgetting=False).systems["raft+rag"]
    probe = run_probe(settings, adapter)
    return {
        "validation": gate.candidate,
        "gate": gate.reason,
        "test": test["accuracy"],
        "test_precision": test["precision"],
        "declined_unanswerable": test["declined_unanswerable"],
        "quotes_grounded": test["quotes_grounded"],
        "probe": sum(probe) / len(probe),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workspace", type=Path, required=True)
    parser.add_argument("--sft", default=None, help="SFT adapter (default: the promoted one)")
    parser.add_argument("--variant", action="append", default=[],
                        help="a JSON object: name plus settings overrides (repeatable); "
                        "default: the README's four")
    args = parser.parse_args()

    from docent.loop import collect_pairs
    from docent.settings import DocentSettings
    from eval.runner import run_probe
    from eval.validation import prepare_validation
    from raft.adapters import AdapterRegistry
    from raft.dpo import train_dpo
    from raft.preferences import load_pairs

    settings = DocentSettings(workspace=args.workspace)
    registry = AdapterRegistry(settings.workspace / "adapters")
    promoted = registry.promoted()
    sft = args.sft or (promoted.name if promoted else None)
    if sft is None:
        sys.exit("no SFT adapter: pass --sft NAME, or promote one (docent adapters promote)")
    info = registry.get(sft)
    variants = [json.loads(v) for v in args.variant] or VARIANTS
    dataset = str(info.metadata.get("dataset", ""))
    vset = prepare_validation(settings, dataset or None)
    probe_base = run_probe(settings, None)
    rows: dict[str, Any] = {
        "sft": {**score(settings, sft, vset), "self_declined": _self_declined(settings, sft, vset)}
    }

    # One set of pairs with every kind; a variant keeps the kinds it asks for.
    pairs_file = settings.workspace / "preferences" / f"{sft}-all-kinds.jsonl"
    pairs_file.parent.mkdir(parents=True, exist_ok=True)
    if not pairs_file.exists():
        made = collect_pairs(settings.with_overrides(dpo_auto_kinds=ALL_KINDS), sft, dataset,
                             pairs_file, feedback=False)
        print("pairs", made["by_origin"], flush=True)
    every = load_pairs(pairs_file)

    for variant in variants:
        overrides = {k: v for k, v in variant.items() if k != "name"}
        vs = settings.with_overrides(**overrides)
        pairs = [p for p in every if p["origin"].removeprefix("auto:") in vs.dpo_auto_kinds]
        name = f"{sft}-{variant['name']}"
        seconds = None
        if not any(a.name == name for a in registry.list()):
            started = time.perf_counter()
            train_dpo(vs, sft=sft, pairs=pairs, name=name)
            seconds = time.perf_counter() - started
        rows[name] = {**score(vs, name, vset), "pairs": len(pairs), "train_s": seconds,
                      "self_declined": _self_declined(vs, name, vset),
                      "settings": overrides}
        print(name, {k: v for k, v in rows[name].items() if k != "gate"}, flush=True)

    OUT_DIR.mkdir(exist_ok=True)
    hardware = describe()
    report = {"hardware": hardware, "sft": sft, "probe_base": sum(probe_base) / len(probe_base),
              "validation_questions": vset.questions, "rows": rows}
    (OUT_DIR / "dpo_ablation.json").write_text(json.dumps(report, indent=2, default=str))
    lines = [f"# DPO ablation from `{sft}` on {summary(hardware)}", "",
             f"Forgetting probe of the base model: {_pct(report['probe_base'])}; "
             f"{vset.questions} validation questions.", "",
             "| adapter | pairs | train | validation | test | declined unanswerable | probe "
             "| self-declined |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        train = f"{r['train_s'] / 60:.1f} min" if r.get("train_s") else ""
        lines.append(f"| {name} | {r.get('pairs', '')} | {train} | {_pct(r['validation'])} | "
                     f"{_pct(r['test'])} | {_pct(r['declined_unanswerable'])} | "
                     f"{_pct(r['probe'])} | {r['self_declined']} |")
    (OUT_DIR / "dpo_ablation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
