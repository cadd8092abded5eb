"""Training throughput of ``docent train`` vs TRL's plain defaults, and vs a FLOP ceiling.

Builds a RAFT set from the handbook's human train questions (no teacher needed), then trains
the embedded SmolLM2 for ``--steps`` steps twice, in one process, on the same examples with
the same LoRA config:

- **ours**: ``raft.train.train_adapter`` (loss on the answer only; on CPU, batches grouped by
  length; ``--packing`` forces packed padding-free rows, the GPU default, to compare);
- **baseline**: ``SFTTrainer`` with ``SFTConfig``'s defaults (padded batches, no packing),
  only the step count, batch size and output folder set.

Both count the non-padding tokens they trained on (``include_num_input_tokens_seen``). The
ceiling is ``6 x parameters x tokens/s`` (the usual estimate of training FLOPs) as a fraction of
the fp32 matmul rate this machine reaches with torch in the same run.

Run (from the repository root)::

    HF_HUB_OFFLINE=1 .venv/bin/python bench/train.py            # ~8 min on 2 cores
    HF_HUB_OFFLINE=1 .venv/bin/python bench/train.py --steps 8

Prints a Markdown table and writes ``bench/out/train.json``; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from docent.hardware import cpu_has_bf16, describe, summary  # noqa: E402
from docent.models import generator_path  # noqa: E402
from docent.settings import DocentSettings  # noqa: E402
from ingest.embedder import Embedder  # noqa: E402
from ingest.pipeline import refresh_index  # noqa: E402
from raft.build import build_raft_set  # noqa: E402
from raft.show import load_examples  # noqa: E402
from raft.train import to_prompt_completion, train_adapter  # noqa: E402


def matmul_gflops(size: int = 1024, repeats: int = 20) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    started = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e9


def baseline(rows: list[dict], steps: int, batch: int, out: Path) -> tuple[float, int]:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    path = generator_path()
    config = SFTConfig(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=batch,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
    )
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(path),
        peft_config=LoraConfig(
            r=16,
            lora_alpha=32,
            lora_dropout=0.05,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        ),
    )
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    return seconds, int(trainer.state.num_input_tokens_seen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2, help="rows per step for both")
    parser.add_argument("--packing", action="store_true", help="ours with packed rows")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="docent-bench-train-"))
    try:
        embedder = Embedder()
        settings = DocentSettings(workspace=tmp / "ws")
        refresh_index([ROOT / "examples" / "handbook"], settings, embedder=embedder)
        build_raft_set(
            settings,
            qa_file=ROOT / "examples" / "handbook" / "qa.jsonl",
            limit=0,
            name="bench",
            embedder=embedder,
        )
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(generator_path())
        rows = [
            to_prompt_completion(r, tokenizer)
            for r in load_examples(tmp / "ws" / "raft" / "bench", "train")
        ]
        gflops = matmul_gflops()
        from transformers import AutoModelForCausalLM

        params = sum(
            p.numel() for p in AutoModelForCausalLM.from_pretrained(generator_path()).parameters()
        )
        ours = train_adapter(
            settings.with_overrides(
                train_max_steps=args.steps, train_batch_size=args.batch, train_eval_steps=10_000
            ),
            dataset="bench",
            name="bench-ours",
        )
        base_s, base_tokens = baseline(rows, args.steps, args.batch, tmp / "baseline")
        base_tps = base_tokens / base_s
        table = {
            "ours": {"seconds": ours.seconds, "tokens_per_s": ours.tokens_per_s},
            "trl_defaults": {"seconds": round(base_s, 1), "tokens_per_s": round(base_tps, 1)},
        }
        for row in table.values():
            row["flop_fraction"] = round(6 * params * row["tokens_per_s"] / (gflops * 1e9), 3)
        result = {
            "steps": args.steps,
            "batch": args.batch,
            "params": params,
            "matmul_gflops": round(gflops, 1),
            "machine": describe(),
            "dtype": "float32 + bf16 autocast" if cpu_has_bf16() else "float32",
            "rows": table,
            "ours_over_trl": round(ours.tokens_per_s / base_tps, 2) if base_tps else None,
        }
        print(
            f"\n### LoRA SFT on {len(rows)} handbook examples, {args.steps} steps x "
            f"{args.batch} rows, SmolLM2 ({params / 1e6:.0f}M params), {summary()}, "
            f"{result['dtype']}\n"
        )
        print("| run | seconds | trained tokens/s | 6·N·tokens/s ÷ matmul peak |")
        print("|---|---:|---:|---:|")
        for label, row in table.items():
            print(
                f"| {label} | {row['seconds']} | {row['tokens_per_s']} | {row['flop_fraction']} |"
            )
        print(
            f"\nmatmul peak (fp32, 1024²): {gflops:.1f} GFLOP/s; ours / TRL defaults: "
            f"{result['ours_over_trl']}x"
        )
        (HERE / "out").mkdir(exist_ok=True)
        (HERE / "out" / "train.json").write_text(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
