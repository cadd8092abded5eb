"""``docent train`` under ``accelerate launch``: the configs in configs/accelerate/ are valid
for accelerate, and a real two-process run on the CPU (gloo DDP,
configs/accelerate/cpu_2proc.yaml) trains one adapter that the main process alone writes,
registers and promotes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from docent.hardware import cpu_has_bf16
from docent.models import generator_id
from docent.settings import DocentSettings
from ingest.pipeline import refresh_index
from raft import rehearsal
from raft.build import build_raft_set
from raft.distributed import precision

from conftest import NO_MODEL_RECIPE, ORBIT_FACTS, ORBIT_QA, ROOT, write_corpus, write_qa

CONFIGS = ROOT / "configs" / "accelerate"
SHIPPED = {
    "ddp": "MULTI_GPU",
    "cpu_2proc": "MULTI_GPU",  # torchrun's launcher; gloo on the CPU (see the file)
    "fsdp": "FSDP",
    "deepspeed_zero2": "DEEPSPEED",
    "deepspeed_zero3": "DEEPSPEED",
}


def _launch_args(name: str):
    """The arguments ``accelerate launch --config_file configs/accelerate/<name>.yaml`` runs with,
    resolved by accelerate's own launcher code."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    parser = launch_command_parser()
    args = parser.parse_args(["--config_file", str(CONFIGS / f"{name}.yaml"), "-m", "docent.cli"])
    args, config, _ = _validate_launch_command(args)
    return args, config


def test_every_shipped_config_is_listed():
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted(SHIPPED)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_config_loads_in_accelerate(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
    assert config.distributed_type.value == SHIPPED[name]
    assert config.num_processes == 2 and config.num_machines == 1
    # Precision is Docent's choice (bf16 where the hardware has it), as in a single process.
    assert config.mixed_precision == "no"
    assert config.use_cpu == (name == "cpu_2proc")
    args, _ = _launch_args(name)
    assert args.num_processes == 2 and args.module


def test_fsdp_config_shards_fully_by_layer_and_saves_a_plain_adapter():
    from accelerate.utils import FullyShardedDataParallelPlugin, patch_environment
    from accelerate.utils.launch import prepare_multi_gpu_env

    args, _ = _launch_args("fsdp")
    env = {k: v for k, v in prepare_multi_gpu_env(args).items() if k.startswith("FSDP_")}
    assert env["FSDP_USE_ORIG_PARAMS"] == "false" and env["FSDP_SYNC_MODULE_STATES"] == "true"
    if not torch.cuda.is_available():
        env["FSDP_SYNC_MODULE_STATES"] = "false"  # the plugin refuses it without an accelerator
    with patch_environment(ACCELERATE_USE_FSDP="true", **env):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 1 and plugin.sharding_strategy.name == "FULL_SHARD"
    assert plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"
    assert plugin.state_dict_type.name == "FULL_STATE_DICT" and plugin.use_orig_params is False


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_configs_take_batch_and_accumulation_from_docent(stage):
    from accelerate.utils import DeepSpeedPlugin, patch_environment
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    args, config = _launch_args(f"deepspeed_zero{stage}")
    # What `accelerate launch` sets before its DeepSpeed launcher (deepspeed is not installed
    # here, so the launch itself is not run).
    args.deepspeed_fields_from_accelerate_config = ",".join(config.deepspeed_config)
    _, env = prepare_deepspeed_cmd_env(args)
    with patch_environment(**{k: v for k, v in env.items() if k.startswith("ACCELERATE_")}):
        plugin = DeepSpeedPlugin()
    ds = plugin.deepspeed_config
    assert plugin.zero_stage == stage
    assert ds["train_micro_batch_size_per_gpu"] == ds["gradient_accumulation_steps"] == "auto"
    # ZeRO-3 gathers the sharded weights when the adapter is saved.
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] == (stage == 3)


@pytest.mark.parametrize(
    ("cuda", "bf16", "mixed", "dtype"),
    [
        (True, True, "bf16", "bfloat16"),
        (False, True, "bf16", "float32 + bf16 autocast"),
        (False, False, "no", "float32"),
        # a launch config asking for fp16 where Docent chose none (a GPU without bf16)
        (True, False, "fp16", "float32 + fp16 autocast"),
    ],
)
def test_metadata_dtype_says_what_the_run_used(cuda, bf16, mixed, dtype):
    assert precision(cuda, bf16, mixed) == dtype


@pytest.fixture(scope="module")
def orbit_workspace(tmp_path_factory, embedder) -> DocentSettings:
    """A tiny RAFT set ("tiny", human questions only) and one cached rehearsal pair, so the
    run rehearses without the model writing anything."""
    root = tmp_path_factory.mktemp("multiproc")
    settings = DocentSettings(
        workspace=root / "ws",
        raft_distractors=2,
        top_k=3,
        raft_split=(0.5, 0.25, 0.25),
        raft_refusal_fraction=0.0,
        **NO_MODEL_RECIPE,
    )
    refresh_index([write_corpus(root / "docs", ORBIT_FACTS)], settings, embedder=embedder)
    qa = write_qa(root / "qa.jsonl", ORBIT_QA)
    build_raft_set(settings, qa_file=qa, name="tiny", limit=0, embedder=embedder)
    cache = settings.workspace / "raft" / "cache" / "rehearsal.jsonl"
    cache.parent.mkdir(parents=True, exist_ok=True)
    key = {
        "generator": generator_id(settings.generator),
        "seed": settings.seed,
        "version": rehearsal.VERSION,
    }
    request, answer = "What colour is a clear daytime sky?", "A clear daytime sky is blue."
    cache.write_text(json.dumps({"key": key, "request": request, "answer": answer}) + "\n")
    return settings


@pytest.mark.slow
def test_two_process_training_writes_and_registers_one_adapter(orbit_workspace):
    ws = orbit_workspace.workspace
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(CONFIGS / "cpu_2proc.yaml"),
        "-m", "docent.cli", "--workspace", str(ws),
        "train", "--dataset", "tiny", "--name", "ddp",
        "--max-steps", "2", "--eval-steps", "2", "--batch-size", "1", "--max-length", "512",
        "--rehearsal", "0.25",  # 3 RAFT rows: 1 rehearsal row, from the cache
        "--promote", "--force", "--engine", "hf",  # the gate scores it, then it is promoted
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    # The summary comes from the main process alone, and says the run was spread over two.
    assert proc.stdout.count("ddp → ") == 1, proc.stdout
    assert proc.stdout.count("2 steps on 2 processes (effective batch 2)") == 1, proc.stdout

    adapters = ws / "adapters"
    published = sorted(p.name for p in adapters.iterdir() if not p.name.startswith("."))
    assert published == ["ddp", "registry.json"]
    assert not list(adapters.glob(".tmp-*")) and not list((adapters / ".runs").iterdir())
    folder = adapters / "ddp"
    for name in ("adapter_model.safetensors", "adapter_config.json", "report.md", "loss.png"):
        assert (folder / name).exists(), name
    meta = json.loads((folder / "metadata.json").read_text())
    parallel = {"processes": 2, "distributed_type": "MULTI_CPU", "effective_batch": 2}
    assert {k: meta["parallel"][k] for k in parallel} == parallel
    # The precision Docent picks for this CPU, not one the launch config imposed.
    assert meta["parallel"]["mixed_precision"] == ("bf16" if cpu_has_bf16() else "no")
    assert meta["examples"]["rehearsal"] == 1 and meta["result"]["steps"] == 2
    assert any("eval_loss" in h for h in meta["loss_curve"])
    assert "x2 processes = 2 per step" in (folder / "report.md").read_text()
    # Registered and promoted once: a second process promoting too would have raced the
    # registry file or scored the adapter twice.
    registry = json.loads((adapters / "registry.json").read_text())
    assert registry == {"promoted": "ddp", "history": ["ddp"]}
    assert len(meta["validation_scores"]) == 1
