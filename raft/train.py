"""``docent train``: LoRA (or QLoRA) fine-tuning on a RAFT set with TRL + PEFT.

Loss is on the assistant answer only: examples go to TRL as conversational prompt/completion
pairs. Short examples waste little compute: on a GPU they are packed best-fit-decreasing into
rows of ``train_max_length`` tokens without padding (position ids restart per example and
transformers builds the block-diagonal mask from them, tested in tests/raft/test_train.py); on
a CPU, where that mask is slow, batches are grouped by length so they pad little.
Validation loss is measured every ``train_eval_steps``, the best checkpoint is kept and early
stopping ends a run that stops improving.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from docent.errors import ConfigError
from docent.hardware import cpu_has_bf16, describe, summary
from docent.models import generator_id, generator_path
from docent.progress import Progress, no_progress
from docent.prompts import chat_prompt
from docent.settings import DocentSettings
from docent.workspace import Workspace
from raft import show
from raft.adapters import METADATA
from raft.distributed import (
    is_main_process,
    on_main,
    parallel_summary,
    precision,
    process_state,
    sharded,
    spread,
    wait_for_everyone,
)
from raft.rehearsal import rehearsal_count, rehearsal_rows

log = logging.getLogger(__name__)
RUNS = ".runs"
TRAINING = "TRAINING.json"


@dataclass
class TrainResult:
    name: str
    path: str
    dataset: str
    steps: int
    train_loss_first: float | None
    train_loss_last: float | None
    best_eval_loss: float | None
    seconds: float
    tokens_per_s: float
    resumed_from: str | None = None
    merged: str | None = None
    # Under `accelerate launch`: one optimizer step saw effective_batch examples (or packed
    # rows), per-device batch x processes x gradient accumulation.
    processes: int = 1
    effective_batch: int | None = None
    log_history: list[dict[str, Any]] = field(default_factory=list)


def to_prompt_completion(record: dict[str, Any], tokenizer: Any) -> dict[str, str]:
    """A RAFT record as the text pair TRL trains on: the prompt exactly as every engine renders
    it (:func:`docent.prompts.chat_prompt`) and the answer, to which TRL appends the EOS token.
    The loss then covers the answer and its end-of-turn token and nothing else; TRL's
    conversational form also trained on the newline the template writes after the turn, and
    left the prompt's rendering to TRL instead of to the function serving uses."""
    messages = record["messages"] if "messages" in record else [
        *record["prompt"], *record["completion"]
    ]
    if messages[-1]["role"] != "assistant":
        raise ConfigError(f"RAFT record {record.get('id')!r} does not end with an answer")
    return {
        "prompt": chat_prompt(tokenizer, messages[:-1]),
        "completion": messages[-1]["content"],
    }


def _device_plan(settings: DocentSettings) -> tuple[bool, bool]:
    import torch

    # accelerate's device for this process: cuda:<local rank> under a multi-GPU launch.
    cuda = process_state().device.type == "cuda"
    if settings.train_qlora and not cuda:
        raise ConfigError(
            "QLoRA trains a 4-bit quantised base with bitsandbytes, which needs a CUDA GPU; "
            "this machine has none. Drop --qlora to train plain LoRA here."
        )
    if cuda:
        return cuda, bool(torch.cuda.is_bf16_supported())
    # CPUs with bf16 instructions (AVX512-BF16, AMX) train ~1.6x faster under bf16 autocast
    # (bench/train.py); the weights stay fp32 there, only matmuls run in bf16.
    return cuda, cpu_has_bf16()


def _load_base(path: str, settings: DocentSettings, cuda: bool, bf16: bool) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    # bf16 weights on GPUs; on CPUs fp32 weights with bf16 autocast (mixed precision).
    kwargs: dict[str, Any] = {"dtype": torch.bfloat16 if bf16 and cuda else torch.float32}
    if settings.train_qlora:
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if bf16 else torch.float16,
        )
        # Each process's whole 4-bit model on its own GPU (DDP), not all of them on GPU 0.
        kwargs["device_map"] = {"": process_state().local_process_index}
        return prepare_model_for_kbit_training(AutoModelForCausalLM.from_pretrained(path, **kwargs))
    model: Any = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    # This process's device (cuda:<local rank> under DDP; the CPU without CUDA), so rehearsal
    # generation runs there too. Under FSDP and ZeRO the wrapper then shards it.
    return model.to(process_state().device)


def _progress_callback(progress: Progress) -> Any:
    from transformers import TrainerCallback

    class RichProgress(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            progress("train", int(state.global_step), int(state.max_steps))

    return RichProgress()


def train_adapter(
    settings: DocentSettings,
    *,
    dataset: str | None = None,
    name: str | None = None,
    resume: bool = False,
    merge: bool = False,
    progress: Progress = no_progress,
    callbacks: list[Any] | None = None,
) -> TrainResult:
    """Train a LoRA adapter on RAFT set ``dataset`` (default: the newest) and publish it in the
    registry as ``name``. Under ``accelerate launch`` every process calls this; the adapter,
    its metadata and the resume state are written by the main process alone
    (``raft.distributed``), and every process returns the same result."""
    from transformers import AutoTokenizer

    ws = Workspace(settings.workspace).ensure()
    adapters_dir = ws.adapters_dir
    state_path = adapters_dir / RUNS / TRAINING
    saved, dataset, name = on_main(lambda: _plan_run(ws, dataset, name, resume))
    settings = settings.with_overrides(**saved)
    main = is_main_process()
    if not main:
        progress = no_progress  # one set of progress bars, the main process's
    cuda, bf16 = _device_plan(settings)
    folder = show.resolve(ws.raft_dir, dataset)
    manifest = show.load_manifest(folder)
    base_path = generator_path(settings.generator, settings.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    train_rows = [to_prompt_completion(r, tokenizer) for r in show.load_examples(folder, "train")]
    val_rows = [
        to_prompt_completion(r, tokenizer) for r in show.load_examples(folder, "validation")
    ]
    if not train_rows:
        raise ConfigError(f"RAFT set {folder.name} has no training examples")
    final = adapters_dir / name
    run_dir = adapters_dir / RUNS / name
    train_fields = {k: v for k, v in settings.model_dump().items() if k.startswith("train_")}
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        state_path.write_text(
            json.dumps({"name": name, "dataset": folder.name, "settings": train_fields})
        )

    model = _load_base(base_path, settings, cuda, bf16)
    # Made once, by the main process (the model writes them and they are cached on disk), and
    # handed to the others: every process must train on the same rows.
    rehearsed, rehearsal_rejected = on_main(
        lambda: rehearsal_rows(
            model,
            tokenizer,
            rehearsal_count(len(train_rows), settings.train_rehearsal),
            seed=settings.seed,
            generator=generator_id(settings.generator),
            cache_dir=ws.raft_dir / "cache",
            progress=progress,
        )
    )
    raft_rows = len(train_rows)
    train_rows += rehearsed
    trainer = make_trainer(
        settings, model, tokenizer, train_rows, val_rows, run_dir,
        cuda=cuda, bf16=bf16, callbacks=[_progress_callback(progress), *(callbacks or [])],
    )
    if merge and sharded(trainer):
        raise ConfigError(
            "--merge needs the whole trained model in one process, and FSDP and DeepSpeed "
            "ZeRO-3 shard it across processes: train without --merge (promotion merges where "
            "serving needs merged weights), or launch with configs/accelerate/ddp.yaml or ZeRO-2"
        )
    checkpoint = on_main(lambda: last_complete_checkpoint(run_dir)) if resume else None
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=checkpoint)
    seconds = time.perf_counter() - started
    # Every process has loaded the best checkpoint: the run folder may go.
    wait_for_everyone()

    staging = adapters_dir / f".tmp-{name}"
    if main:
        shutil.rmtree(staging, ignore_errors=True)
    # On every process: under FSDP or ZeRO-3 saving gathers the shards; the main process writes.
    trainer.save_model(str(staging))
    history = list(trainer.state.log_history)
    parallel = parallel_summary(trainer)
    losses = [h["loss"] for h in history if "loss" in h]
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    tokens = float(getattr(trainer.state, "num_input_tokens_seen", 0) or 0)
    # Throughput counts training time only: validation passes are logged separately.
    train_seconds = seconds - sum(h.get("eval_runtime", 0.0) for h in history)
    result = TrainResult(
        name=name,
        path=str(final),
        dataset=folder.name,
        steps=int(trainer.state.global_step),
        train_loss_first=losses[0] if losses else None,
        train_loss_last=losses[-1] if losses else None,
        best_eval_loss=min(evals) if evals else None,
        seconds=round(seconds, 1),
        tokens_per_s=round(tokens / train_seconds, 1) if train_seconds > 0 else 0.0,
        resumed_from=checkpoint,
        merged=str(final / "merged") if merge else None,
        processes=parallel["processes"],
        effective_batch=parallel["effective_batch"],
        log_history=history,
    )

    def publish() -> None:
        """Metadata, report and merged weights into the staging folder, renamed into place:
        a crash leaves no half adapter in the registry. The folder is the registration;
        promotion is explicit."""
        tokenizer.save_pretrained(str(staging))
        if merge:
            merged = staging / "merged"
            peft_model: Any = trainer.model
            peft_model.merge_and_unload().save_pretrained(str(merged))
            tokenizer.save_pretrained(str(merged))
        meta = {
            "name": name,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "base_model": generator_id(settings.generator),
            "base_path": base_path,
            "dataset": folder.name,
            "dataset_hash": manifest.get("dataset_hash"),
            "dataset_params": manifest.get("params"),
            "hyperparameters": train_fields,
            "device": "cuda" if cuda else "cpu",
            "dtype": precision(cuda, bf16, parallel["mixed_precision"]),
            "parallel": parallel,
            "hardware": describe(),
            "examples": {
                "train": raft_rows,
                "validation": len(val_rows),
                "rehearsal": len(rehearsed),
            },
            "rehearsal_rejected": dict(rehearsal_rejected),
            "result": {k: v for k, v in asdict(result).items() if k != "log_history"},
            "loss_curve": [
                {k: h[k] for k in ("step", "loss", "eval_loss") if k in h}
                for h in history
                if "loss" in h or "eval_loss" in h
            ],
            "eval": None,
        }
        (staging / METADATA).write_text(json.dumps(meta, indent=2))
        _write_report(staging, meta)
        os.rename(staging, final)
        state_path.unlink(missing_ok=True)
        shutil.rmtree(run_dir, ignore_errors=True)
        log.info(
            "trained %s: %d steps on %d process(es), effective batch %d",
            name,
            result.steps,
            parallel["processes"],
            parallel["effective_batch"],
        )

    # The others wait for it: when this returns, the adapter is in the registry everywhere.
    on_main(publish)
    return result


def _plan_run(
    ws: Workspace, dataset: str | None, name: str | None, resume: bool
) -> tuple[dict[str, Any], str, str]:
    """The run's saved training settings (a resumed run's; none for a new run), its RAFT set
    and its adapter name (a new run's from the set and the time)."""
    state_path = ws.adapters_dir / RUNS / TRAINING
    saved: dict[str, Any] = {}
    if resume:
        if not state_path.exists():
            raise ConfigError("nothing to resume: no interrupted `docent train` run was found")
        state = json.loads(state_path.read_text())
        saved, dataset, name = state["settings"], state["dataset"], state["name"]
    folder = show.resolve(ws.raft_dir, dataset)
    name = name or f"{folder.name}-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}"
    if (ws.adapters_dir / name).exists():
        raise ConfigError(f"an adapter named {name!r} exists already: choose another --name")
    return saved, folder.name, name


def last_complete_checkpoint(run_dir: Path) -> str | None:
    """The newest checkpoint a resume can load. A process killed while writing one leaves a
    folder without ``trainer_state.json`` (transformers writes it last), which
    ``get_last_checkpoint`` would still pick and the resume would then fail on: such folders
    are removed, and the one before is used."""
    found = sorted(
        (p for p in run_dir.glob("checkpoint-*") if p.is_dir() and p.name[11:].isdigit()),
        key=lambda p: int(p.name[11:]),
        reverse=True,
    )
    for folder in found:
        if (folder / "trainer_state.json").exists():
            return str(folder)
        log.warning("removing %s: it was cut off while being written", folder)
        shutil.rmtree(folder, ignore_errors=True)
    return None


def make_trainer(
    settings: DocentSettings,
    model: Any,
    tokenizer: Any,
    train_rows: list[dict[str, str]],
    val_rows: list[dict[str, str]],
    run_dir: Path,
    *,
    cuda: bool = False,
    bf16: bool = False,
    callbacks: list[Any] | None = None,
) -> Any:
    """The TRL trainer ``train_adapter`` runs: LoRA on ``model``, loss on the completions.
    Tests build it too, to check what it trains on against what the engines are prompted with."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import EarlyStoppingCallback
    from trl import SFTConfig, SFTTrainer

    named = settings.train_target_modules
    targets: str | list[str] = named
    if named != "all-linear":
        targets = [t.strip() for t in named.split(",") if t.strip()]
    peft_config = LoraConfig(
        r=settings.train_lora_r,
        lora_alpha=settings.train_lora_alpha,
        lora_dropout=settings.train_lora_dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    has_val = bool(val_rows)
    pack = cuda if settings.train_packing is None else settings.train_packing
    config = SFTConfig(
        **trainer_arguments(settings, run_dir, settings.train_epochs, settings.train_lr,
                            len(train_rows), cuda=cuda, bf16=bf16),
        per_device_eval_batch_size=settings.train_batch_size,
        # GPU: best-fit-decreasing packing into max_length rows, padding-free (varlen kernels
        # make that the fastest). CPU: a packed row needs an explicit block mask, which made a
        # forward+backward pass 1.5x slower than a padded batch, so batches are grouped by
        # length instead and pad little.
        packing=pack,
        packing_strategy="bfd",
        padding_free=pack,
        train_sampling_strategy="random" if pack else "group_by_length",
        completion_only_loss=True,
        eval_strategy="steps" if has_val else "no",
        eval_steps=settings.train_eval_steps,
        load_best_model_at_end=has_val,
        metric_for_best_model="eval_loss" if has_val else None,
        greater_is_better=False,
        include_num_input_tokens_seen="non_padding",
    )
    all_callbacks = list(callbacks or [])
    if has_val:
        all_callbacks.append(EarlyStoppingCallback(early_stopping_patience=settings.train_patience))
    return SFTTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(val_rows) if has_val else None,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=all_callbacks,
    )


def trainer_arguments(
    settings: DocentSettings,
    run_dir: Path,
    epochs: float,
    lr: float,
    examples: int,
    *,
    cuda: bool,
    bf16: bool,
) -> dict[str, Any]:
    """What SFT and DPO training share: schedule, batch, checkpoints every
    ``train_eval_steps`` (what a resume starts from), precision and device."""
    return {
        "output_dir": str(run_dir),
        "num_train_epochs": epochs,
        "max_steps": settings.train_max_steps or -1,
        "learning_rate": lr,
        "lr_scheduler_type": "cosine",
        "warmup_steps": _warmup_steps(settings, examples, epochs),
        "per_device_train_batch_size": settings.train_batch_size,
        "gradient_accumulation_steps": settings.train_grad_accum,
        "max_length": settings.train_max_length,
        "logging_steps": 1,
        "save_strategy": "steps",
        "save_steps": settings.train_eval_steps,
        "save_total_limit": 2,
        "bf16": bf16,
        "use_cpu": not cuda,
        "seed": settings.seed,
        "report_to": [],
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        # Under DDP: every LoRA weight takes part in every forward pass, so DDP need not search
        # the graph for unused ones after each step (transformers would, for a PEFT model).
        "ddp_find_unused_parameters": False,
    }


def _warmup_steps(settings: DocentSettings, examples: int, epochs: float | None = None) -> int:
    """5% of the steps, rounded down. transformers rounds a warm-up *ratio* up, so a 4-step
    run spent its first step at learning rate 0, and a 1-step run never changed the adapter.
    A step takes a batch on every process: N processes make an epoch N times shorter."""
    processes = process_state().num_processes
    per_step = settings.train_batch_size * settings.train_grad_accum * processes
    per_epoch = math.ceil(examples / per_step)
    total = settings.train_max_steps or math.ceil(per_epoch * (epochs or settings.train_epochs))
    return int(0.05 * total)


def _write_report(folder: Path, meta: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = meta["loss_curve"]
    train = [(h["step"], h["loss"]) for h in curve if "loss" in h]
    val = [(h["step"], h["eval_loss"]) for h in curve if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", color="#1f77b4")
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation loss", color="#d62728")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (assistant tokens)")
    ax.set_title(f"{meta['name']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "loss.png", dpi=110)
    plt.close(fig)
    r = meta["result"]
    hp = meta["hyperparameters"]
    lines = [
        f"# Training report: {meta['name']}",
        "",
        f"- base model: `{meta['base_model']}` ({meta['device']}, {meta['dtype']}) on "
        f"{summary(meta['hardware'])}",
        f"- dataset: `{meta['dataset']}` (hash `{str(meta['dataset_hash'])[:12]}`), "
        f"{meta['examples']['train']} train / {meta['examples']['validation']} validation",
        f"- steps: {r['steps']}, wall time {r['seconds']} s, {r['tokens_per_s']} tokens/s",
        f"- train loss: {r['train_loss_first']} → {r['train_loss_last']}; "
        f"best validation loss: {r['best_eval_loss']}",
        f"- LoRA r={hp['train_lora_r']} alpha={hp['train_lora_alpha']} "
        f"targets={hp['train_target_modules']}, lr={hp['train_lr']}, "
        f"batch={hp['train_batch_size']}x{hp['train_grad_accum']}{spread(meta['parallel'])}",
        "",
        "![loss](loss.png)",
        "",
        "| step | train loss | validation loss |",
        "|---:|---:|---:|",
    ]
    for h in meta["loss_curve"]:
        lines.append(f"| {h['step']} | {h.get('loss', '')} | {h.get('eval_loss', '')} |")
    (folder / "report.md").write_text("\n".join(lines) + "\n")
