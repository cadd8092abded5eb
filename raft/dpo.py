"""``docent train --method dpo``: preference tuning of an SFT adapter with TRL's DPOTrainer.

The SFT adapter is both the start and the reference: loaded trainable as PEFT's "default"
adapter, TRL copies it into a frozen "ref" adapter and scores the reference with it, so
no second model is loaded. Only "default" is saved: the result is a LoRA adapter of the
SFT adapter's shape on the same base, which the registry and every engine load unchanged.

Pairs (``raft.preferences``) are rendered like SFT examples: the prompt by
:func:`docent.prompts.chat_prompt`, chosen and rejected as plain text to which TRL appends
the EOS token, as SFTTrainer does to a completion; the loss covers the answer and its
end-of-turn token only.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from docent.errors import ConfigError
from docent.hardware import describe, summary
from docent.models import generator_id, generator_path
from docent.progress import Progress, no_progress
from docent.prompts import chat_prompt
from docent.settings import DocentSettings
from docent.workspace import Workspace
from raft.adapters import METADATA, AdapterError, AdapterInfo, AdapterRegistry
from raft.distributed import (
    is_main_process,
    on_main,
    parallel_summary,
    precision,
    sharded,
    spread,
    wait_for_everyone,
)
from raft.preferences import check_pair, load_pairs, write_pairs
from raft.train import (
    RUNS,
    TrainResult,
    _device_plan,
    _load_base,
    _progress_callback,
    last_complete_checkpoint,
    trainer_arguments,
)

log = logging.getLogger(__name__)
# Apart from SFT's TRAINING.json: an interrupted SFT run and an interrupted DPO run each
# resume on their own.
DPO_TRAINING = "DPO_TRAINING.json"
PAIRS_FILE = "pairs.jsonl"
CURVE_KEYS = (
    "step",
    "loss",
    "rewards/accuracies",
    "rewards/margins",
    "rewards/chosen",
    "rewards/rejected",
)


def train_dpo(
    settings: DocentSettings,
    *,
    sft: str | None = None,
    pairs: list[dict[str, Any]] | Path | None = None,
    name: str | None = None,
    resume: bool = False,
    progress: Progress = no_progress,
    callbacks: list[Any] | None = None,
) -> TrainResult:
    """Train adapter ``name`` (default ``<sft>-dpo-<UTC time>``) from SFT adapter ``sft`` on
    preference ``pairs`` (a list or a JSONL file). ``resume``: continue the interrupted run
    from its last checkpoint (every ``train_eval_steps`` steps) with its settings and pairs."""
    ws = Workspace(settings.workspace).ensure()
    adapters_dir = ws.adapters_dir
    state_path = adapters_dir / RUNS / DPO_TRAINING
    saved, sft, name = on_main(lambda: _plan_run(adapters_dir, sft, name, resume))
    settings = settings.with_overrides(**saved)
    run_dir = adapters_dir / RUNS / name
    if resume:
        pairs = run_dir / PAIRS_FILE
    if pairs is None:
        raise ConfigError("train_dpo needs the SFT adapter (sft=) and the preference pairs")
    main = is_main_process()
    if not main:
        progress = no_progress  # one set of progress bars, the main process's
    parent = _parent(adapters_dir, sft, settings.generator)
    given = pairs
    # Read by the main process and handed to the others: a resumed run's pairs file is
    # rewritten below, and every process must train on the same pairs.
    rows = on_main(lambda: _checked_pairs(settings, given))
    cuda, bf16 = _device_plan(settings)
    final = adapters_dir / name

    trainer, tokenizer = _make_trainer(
        settings,
        parent,
        rows,
        run_dir,
        cuda,
        bf16,
        [_progress_callback(progress), *(callbacks or [])],
    )
    if len(trainer.train_dataset) == 0:
        if main:
            state_path.unlink(missing_ok=True)  # nothing a resume could continue
            shutil.rmtree(run_dir, ignore_errors=True)
        raise ConfigError(
            f"every pair's prompt is {settings.train_max_length} tokens or longer, so no answer "
            "token is left to train on: raise DOCENT_TRAIN_MAX_LENGTH or retrieve fewer chunks"
        )
    if sharded(trainer):
        raise ConfigError(
            "DPO saves its trained adapter from one process, and FSDP and DeepSpeed ZeRO-3 "
            "shard it across processes: launch DPO with configs/accelerate/ddp.yaml or "
            "configs/accelerate/deepspeed_zero2.yaml"
        )
    hyper = _hyperparameters(settings)
    pairs_hash = ""
    if main:
        if not resume:
            # Checkpoints of an abandoned run under this name must not mix with this run's.
            shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        pairs_hash = write_pairs(rows, run_dir / PAIRS_FILE)
        state_path.write_text(json.dumps({"name": name, "sft": sft, "settings": hyper}))
    checkpoint = on_main(lambda: last_complete_checkpoint(run_dir)) if resume else None
    if checkpoint is not None:
        _restore_checkpoint(trainer.model, checkpoint)
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=checkpoint)
    seconds = time.perf_counter() - started
    wait_for_everyone()  # every process is done with the checkpoints

    history = list(trainer.state.log_history)
    result = _result(name, final, parent, trainer, history, seconds, checkpoint)
    parallel = parallel_summary(trainer)
    result.processes, result.effective_batch = parallel["processes"], parallel["effective_batch"]

    def publish() -> None:
        meta = _metadata(
            settings, parent, result, history, rows, pairs_hash, hyper, cuda, bf16, parallel
        )
        _publish(trainer, tokenizer, meta, run_dir, final)
        state_path.unlink(missing_ok=True)
        shutil.rmtree(run_dir, ignore_errors=True)

    on_main(publish)  # the others wait: when this returns the adapter is in the registry
    return result


def _plan_run(
    adapters_dir: Path, sft: str | None, name: str | None, resume: bool
) -> tuple[dict[str, Any], str, str]:
    """The run's saved settings (a resumed run's; none for a new run), its SFT adapter and its
    name (a new run's from the SFT adapter and the time)."""
    state_path = adapters_dir / RUNS / DPO_TRAINING
    saved: dict[str, Any] = {}
    if resume:
        if not state_path.exists():
            raise ConfigError("nothing to resume: no interrupted DPO training run was found")
        state = json.loads(state_path.read_text())
        saved, sft, name = state["settings"], state["sft"], state["name"]
    if sft is None:
        raise ConfigError("train_dpo needs the SFT adapter (sft=) and the preference pairs")
    name = name or f"{sft}-dpo-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}"
    if (adapters_dir / name).exists():
        raise ConfigError(f"an adapter named {name!r} exists already: choose another --name")
    return saved, sft, name


def _checked_pairs(
    settings: DocentSettings, pairs: list[dict[str, Any]] | Path
) -> list[dict[str, Any]]:
    rows = load_pairs(pairs) if isinstance(pairs, Path) else list(pairs)
    for n, pair in enumerate(rows, start=1):
        check_pair(pair, f"#{n}")
    if len(rows) > settings.dpo_max_pairs:
        log.info(
            "using the first %d of %d pairs (dpo_max_pairs)", settings.dpo_max_pairs, len(rows)
        )
        rows = rows[: settings.dpo_max_pairs]
    if not rows:
        raise ConfigError(
            "no preference pairs: the SFT adapter answered its training questions right and "
            "grounded, and no feedback holds a correction or an upvote; collect feedback "
            "(POST /v1/feedback) or keep the SFT adapter"
        )
    return rows


def _publish(
    trainer: Any, tokenizer: Any, meta: dict[str, Any], run_dir: Path, final: Path
) -> None:
    """Write the adapter into a staging folder and rename it into place: a crash leaves no
    half adapter in the registry."""
    staging = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(staging, ignore_errors=True)
    # Only the trained adapter: the frozen "ref" copy would land in staging/ref/.
    trainer.model.save_pretrained(str(staging), selected_adapters=["default"])
    tokenizer.save_pretrained(str(staging))
    shutil.copyfile(run_dir / PAIRS_FILE, staging / PAIRS_FILE)
    (staging / METADATA).write_text(json.dumps(meta, indent=2))
    _write_report(staging, meta)
    os.rename(staging, final)


def _parent(adapters_dir: Path, sft: str, generator: str) -> AdapterInfo:
    registry = AdapterRegistry(adapters_dir)
    try:
        info = registry.get(sft)
        registry.check_base(info, generator)
    except AdapterError as exc:
        raise ConfigError(f"cannot preference-tune SFT adapter {sft!r}: {exc}") from exc
    return info


def _hyperparameters(settings: DocentSettings) -> dict[str, Any]:
    return {k: v for k, v in settings.model_dump().items() if k.startswith(("dpo_", "train_"))}


def _make_trainer(
    settings: DocentSettings,
    parent: AdapterInfo,
    pairs: list[dict[str, Any]],
    run_dir: Path,
    cuda: bool,
    bf16: bool,
    callbacks: list[Any],
) -> tuple[Any, Any]:
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    base_path = generator_path(settings.generator, settings.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    rows = [
        {
            "prompt": chat_prompt(tokenizer, p["prompt"]),
            "chosen": p["chosen"],
            "rejected": p["rejected"],
        }
        for p in pairs
    ]
    model = PeftModel.from_pretrained(
        _load_base(base_path, settings, cuda, bf16), str(parent.path), is_trainable=True
    )
    sft_weight = settings.dpo_sft_weight
    config = DPOConfig(
        **trainer_arguments(settings, run_dir, settings.dpo_epochs, settings.dpo_lr, len(rows),
                            cuda=cuda, bf16=bf16),
        beta=settings.dpo_beta,
        # RPO (Pang et al. 2024): a likelihood term on the chosen answer keeps DPO from
        # lowering both answers' probability together.
        loss_type=[settings.dpo_loss, "sft"] if sft_weight > 0 else [settings.dpo_loss],
        loss_weights=[1.0, sft_weight] if sft_weight > 0 else None,
    )
    trainer = DPOTrainer(
        model=model,
        ref_model=None,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    return trainer, tokenizer


def _restore_checkpoint(model: Any, checkpoint: str) -> None:
    """Load the "default" adapter of an interrupted run's last checkpoint now.
    A checkpoint holds two adapters ("default" at the top, "ref" in ref/), and transformers'
    resume then reloads only the sub-folder ones: "default" would restart from the SFT
    weights while the step count and optimizer state moved on."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(str(Path(checkpoint) / "adapter_model.safetensors"))
    set_peft_model_state_dict(model, weights, adapter_name="default")


def _result(
    name: str,
    final: Path,
    parent: AdapterInfo,
    trainer: Any,
    history: list[dict[str, Any]],
    seconds: float,
    checkpoint: str | None,
) -> TrainResult:
    losses = [h["loss"] for h in history if "loss" in h]
    # DPOTrainer logs its running token count (prompt, chosen and rejected) as num_tokens.
    tokens = float(max((h.get("num_tokens", 0) for h in history), default=0))
    return TrainResult(
        name=name,
        path=str(final),
        dataset=str(parent.metadata.get("dataset", "")),
        steps=int(trainer.state.global_step),
        train_loss_first=losses[0] if losses else None,
        train_loss_last=losses[-1] if losses else None,
        best_eval_loss=None,
        seconds=round(seconds, 1),
        tokens_per_s=round(tokens / seconds, 1) if seconds > 0 and tokens else 0.0,
        resumed_from=checkpoint,
        log_history=history,
    )


def _metadata(
    settings: DocentSettings,
    parent: AdapterInfo,
    result: TrainResult,
    history: list[dict[str, Any]],
    pairs: list[dict[str, Any]],
    pairs_hash: str,
    hyper: dict[str, Any],
    cuda: bool,
    bf16: bool,
    parallel: dict[str, Any],
) -> dict[str, Any]:
    by_origin: dict[str, int] = {}
    for pair in pairs:
        by_origin[pair["origin"]] = by_origin.get(pair["origin"], 0) + 1
    return {
        "name": result.name,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "base_model": generator_id(settings.generator),
        "base_path": generator_path(settings.generator, settings.cache_dir),
        "method": "dpo",
        "parent": parent.name,
        "dataset": parent.metadata.get("dataset"),
        "dataset_hash": parent.metadata.get("dataset_hash"),
        "pairs": {
            "count": len(pairs),
            "by_origin": by_origin,
            "file": PAIRS_FILE,
            "sha256": pairs_hash,
        },
        "hyperparameters": hyper,
        "device": "cuda" if cuda else "cpu",
        "dtype": precision(cuda, bf16, parallel["mixed_precision"]),
        "parallel": parallel,
        "hardware": describe(),
        "result": {k: v for k, v in asdict(result).items() if k != "log_history"},
        "loss_curve": [{k: h[k] for k in CURVE_KEYS if k in h} for h in history if "loss" in h],
        "eval": None,
    }


def _write_report(folder: Path, meta: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = meta["loss_curve"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, color in (
        ("rewards/margins", "#1f77b4"),
        ("rewards/accuracies", "#2ca02c"),
        ("loss", "#d62728"),
    ):
        points = [(h["step"], h[key]) for h in curve if key in h]
        if points:
            ax.plot(*zip(*points, strict=True), "o-", label=key, color=color)
    ax.set_xlabel("step")
    ax.set_title(f"{meta['name']} (DPO from {meta['parent']})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "rewards.png", dpi=110)
    plt.close(fig)
    r, hp, pairs = meta["result"], meta["hyperparameters"], meta["pairs"]
    origins = ", ".join(f"{k} {v}" for k, v in sorted(pairs["by_origin"].items()))
    lines = [
        f"# Preference tuning report: {meta['name']}",
        "",
        f"- base model: `{meta['base_model']}` ({meta['device']}, {meta['dtype']}) on "
        f"{summary(meta['hardware'])}",
        f"- reference and start: SFT adapter `{meta['parent']}` (dataset `{meta['dataset']}`)",
        f"- pairs: {pairs['count']} ({origins}), sha256 `{pairs['sha256'][:12]}`",
        f"- steps: {r['steps']}, wall time {r['seconds']} s",
        f"- loss: {_cell(r['train_loss_first'])} → {_cell(r['train_loss_last'])}",
        f"- beta={hp['dpo_beta']}, lr={hp['dpo_lr']}, loss={hp.get('dpo_loss', 'sigmoid')}, "
        f"sft weight={hp['dpo_sft_weight']}, "
        f"batch={hp['train_batch_size']}x{hp['train_grad_accum']}{spread(meta['parallel'])}",
        "",
        "![rewards](rewards.png)",
        "",
        "| step | loss | reward accuracy | reward margin |",
        "|---:|---:|---:|---:|",
    ]
    for h in curve:
        cells = [_cell(h.get(k)) for k in ("loss", "rewards/accuracies", "rewards/margins")]
        lines.append(f"| {h['step']} | {' | '.join(cells)} |")
    (folder / "report.md").write_text("\n".join(lines) + "\n")


def _cell(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"
