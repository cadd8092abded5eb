"""What the machine can do fast, asked once and shared by the engines and training."""

from __future__ import annotations

import functools


@functools.cache
def cpu_has_bf16() -> bool:
    """True on CPUs with bf16 instructions (AVX512-BF16 or AMX). Without them bf16 matmuls
    are emulated: oneDNN refuses them and vLLM-CPU falls back to plain torch linears."""
    import torch

    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())

