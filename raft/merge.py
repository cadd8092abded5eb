"""An adapter merged into its base weights: a plain model folder any engine loads with no
LoRA kernels at all.

vLLM's CPU backend applies LoRA by gathering a copy of each token's LoRA matrices
(``vllm/lora/ops/torch_ops``): memory traffic that grows with batched tokens x LoRA rank and
timed out its ``execute_model`` RPC on both CPU kinds. Merged weights cost what the base
model costs. They are written once, when an adapter is promoted (or first served merged),
into ``<adapter>/merged/``, and reused after that.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from docent.engine import Engine, build_engine
from docent.engine.factory import merges_adapters, resolve_engine_kind
from docent.models import generator_path
from docent.settings import DocentSettings
from raft.adapters import AdapterError, AdapterInfo
from raft.registry_store import open_registry

log = logging.getLogger(__name__)
MERGED = "merged"


def merged_weights(info: AdapterInfo, settings: DocentSettings) -> Path:
    """The folder of ``info`` merged into the generator's weights, written now if missing.
    Written to a staging folder and renamed into place, so a crash leaves no half model."""
    target = info.path / MERGED
    if (target / "config.json").exists():
        return target
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = generator_path(settings.generator, settings.cache_dir)
    staging = info.path / f".{MERGED}-tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        # fp32 like the embedded checkpoint: the merged model then resolves its dtype exactly
        # as the base does (bf16 where the machine has bf16 instructions, fp32 elsewhere).
        model: Any = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        model = PeftModel.from_pretrained(model, str(info.path)).merge_and_unload()
        model.save_pretrained(str(staging))
        AutoTokenizer.from_pretrained(str(info.path)).save_pretrained(str(staging))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    except (OSError, ValueError) as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise AdapterError(
            f"could not write merged weights for {info.name!r} into {target}: {exc}; "
            "free disk space and promote it again"
        ) from exc
    log.info("merged %s into %s", info.name, target)
    return target


def engine_for_adapter(
    settings: DocentSettings, info: AdapterInfo | None, serving: bool = False
) -> tuple[Engine, str | None]:
    """An engine that answers with ``info`` (None: the base model), and the adapter name its
    requests must carry. Where the engine's LoRA path is slow (``merges_adapters``: vLLM on a
    CPU) it runs the merged weights with no LoRA slots and requests carry no adapter."""
    kind = resolve_engine_kind(settings)
    if merges_adapters(kind):
        path = str(merged_weights(info, settings)) if info else None
        return build_engine(settings, kind, serving, model_path=path, lora=False), None
    engine = build_engine(settings, kind, serving, lora_rank=info.lora_rank if info else 16)
    if info is None:
        return engine, None
    engine.add_adapter(info.name, str(info.path))
    return engine, info.name


def serving_engine(settings: DocentSettings, serving: bool = True) -> Engine:
    """The engine ``docent serve`` and ``docent ask`` answer with. Where adapters run merged
    (vLLM on a CPU) it is a ``RoutedEngine``: vLLM over the served adapter's merged weights
    (``settings.serve_adapter``: the promoted one by default), and a transformers engine,
    built on first use, for requests naming the base model or another adapter."""
    kind = resolve_engine_kind(settings)
    registry = open_registry(settings)
    if not merges_adapters(kind):
        ranks = [info.lora_rank for info in registry.compatible(settings.generator)]
        return build_engine(settings, kind, serving, lora_rank=max(ranks, default=16))
    from docent.engine.routed import RoutedEngine

    wanted = settings.serve_adapter
    info = None
    if wanted != "base":
        info = registry.promoted() if wanted == "promoted" else registry.get(wanted)
    if info is not None:
        registry.check_base(info, settings.generator)
    path = str(merged_weights(info, settings)) if info else None
    primary = build_engine(settings, kind, serving, model_path=path, lora=False)
    return RoutedEngine(primary, info.name if info else None,
                        lambda: build_engine(settings, "hf", serving))


def merge_if_served_merged(info: AdapterInfo, settings: DocentSettings) -> Path | None:
    """At promotion: write the merged weights now where the engine the settings pick serves
    adapters merged, so the first answer after a restart does not wait for them."""
    if not merges_adapters(resolve_engine_kind(settings)):
        return None
    return merged_weights(info, settings)
