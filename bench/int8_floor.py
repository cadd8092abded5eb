"""How close can int8 get? The embedder's quality under int8 schemes, simulated in torch.

ONNX Runtime's int8 (DOCENT_EMBED_PRECISION=int8) quantizes each matmul's weights per output
channel and its activations per tensor. This script asks whether *any* common int8 scheme
keeps recall@10 against the fp32 index at the 0.99 the precision issue asks for, so that a
faster int8 kernel would be worth looking for. It fake-quantizes every ``nn.Linear`` of the
sentence-transformers model (values rounded to 8 bits, arithmetic in fp32: the numbers an
exact int8 kernel would give, whatever its speed) and reports, per scheme, recall@10 of a
flat index built with it against the fp32 one, and the cosine of each chunk's vector to its
fp32 vector. Schemes:

- weights per output channel or per group of 32 inputs (as ``MatMulNBits`` blocks);
- activations not quantized (weight-only), per tensor (one scale for the batch, as ONNX
  Runtime's ``DynamicQuantizeLinear``), or per token;
- SmoothQuant (Xiao et al. 2023): input channels divided by s_j = max|X_j|^a / max|W_j|^(1-a)
  and the weight columns multiplied by it, with max|X_j| from calibration chunks.

The corpus is bench/ingest.py's recall corpus (pydoc topics + stdlib docstrings), chunked by
Docent, with 200 seeded queries. Run: ``HF_HUB_OFFLINE=1 .venv/bin/python bench/int8_floor.py``.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

# (label, weight granularity, activation granularity, SmoothQuant alpha or None)
SCHEMES: list[tuple[str, str, str, float | None]] = [
    ("weights per channel, activations fp32", "channel", "none", None),
    ("weights per group of 32, activations fp32", "group32", "none", None),
    ("per channel + per-tensor activations (ONNX Runtime dynamic)", "channel", "tensor", None),
    ("per channel + per-token activations", "channel", "token", None),
    ("per channel + per-token activations + SmoothQuant 0.5", "channel", "token", 0.5),
    ("per group of 32 + per-token activations + SmoothQuant 0.5", "group32", "token", 0.5),
]


def fake_quant(x: torch.Tensor, reduce_dims: tuple[int, ...] | None) -> torch.Tensor:
    """Symmetric 8-bit rounding, one scale per slice left after reducing ``reduce_dims``
    (``None``: one scale for the whole tensor)."""
    peak = x.abs().amax() if reduce_dims is None else x.abs().amax(dim=reduce_dims, keepdim=True)
    scale = peak.clamp(min=1e-8) / 127
    return (x / scale).round().clamp(-127, 127) * scale


class FakeInt8Linear(torch.nn.Module):
    def __init__(
        self, linear: torch.nn.Linear, weights: str, activations: str, smooth: torch.Tensor | None
    ) -> None:
        super().__init__()
        w = linear.weight.detach().clone()
        if smooth is not None:
            w = w * smooth[None, :]
        if weights == "group32":
            out, inp = w.shape
            w = fake_quant(w.reshape(out, inp // 32, 32), (2,)).reshape(out, inp)
        else:
            w = fake_quant(w, (1,))
        self.weight, self.bias = w, linear.bias
        self.activations, self.smooth = activations, smooth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.smooth is not None:
            x = x / self.smooth
        if self.activations == "tensor":
            x = fake_quant(x, None)
        elif self.activations == "token":
            x = fake_quant(x, (-1,))
        return torch.nn.functional.linear(x, self.weight, self.bias)


def input_peaks(model: Any, texts: list[str]) -> dict[str, torch.Tensor]:
    """Per linear layer, max |input| of each input channel over ``texts``."""
    peaks: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Any:
        def record(_module: Any, inputs: tuple[torch.Tensor, ...], _out: Any) -> None:
            x = inputs[0].detach().abs().reshape(-1, inputs[0].shape[-1]).amax(0)
            peaks[name] = torch.maximum(peaks[name], x) if name in peaks else x

        return record

    handles = [
        m.register_forward_hook(hook(n))
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
    ]
    try:
        model.encode(texts, batch_size=32)
    finally:
        for h in handles:
            h.remove()
    return peaks


def quantized_model(
    path: str, weights: str, activations: str, alpha: float | None, calibration: list[str]
) -> Any:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(path, device="cpu")
    peaks = input_peaks(model, calibration) if alpha is not None else {}
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    for name, linear in linears:
        smooth = None
        if alpha is not None:
            w_peak = linear.weight.detach().abs().amax(0).clamp(min=1e-5)
            smooth = (peaks[name].clamp(min=1e-5) ** alpha / w_peak ** (1 - alpha)).clamp(1e-5)
        parent, _, attr = name.rpartition(".")
        setattr(
            model.get_submodule(parent),
            attr,
            FakeInt8Linear(linear, weights, activations, smooth),
        )
    return model


def embed(model: Any, texts: list[str]) -> np.ndarray:
    return np.asarray(model.encode(texts, batch_size=32, normalize_embeddings=True))


def top10(queries: np.ndarray, chunks: np.ndarray) -> np.ndarray:
    return np.argsort(-(queries @ chunks.T), axis=1)[:, :10]


def bench_ingest() -> Any:
    """bench/ingest.py as a module (its name is taken by the ``ingest`` package)."""
    spec = importlib.util.spec_from_file_location("bench_ingest", HERE / "ingest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recall-modules", type=int, default=93)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--calibration", type=int, default=64, help="chunks for SmoothQuant")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from docent.hardware import cpu_flags
    from docent.models import embedder_path
    from docent.settings import DocentSettings
    from ingest.embedder import Embedder
    from ingest.pipeline import refresh_index

    bench = bench_ingest()
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
    model_name, flags = cpu_flags()
    print(f"CPU: {model_name}; flags: {' '.join(f for f in wanted if f in flags)}")
    with tempfile.TemporaryDirectory(prefix="docent-int8-floor-") as tmp_name:
        tmp = Path(tmp_name)
        info = bench.build_doc_corpus(tmp / "docs", args.recall_modules)
        settings = DocentSettings(workspace=tmp / "ws", embed_precision="fp32")
        refresh_index([tmp / "docs"], settings, embedder=Embedder(precision="fp32"))
        chunks = [t for _, t in bench._chunk_texts_by_id(settings.workspace / "index")]
    rng = random.Random(args.seed)
    queries = bench.make_queries([(str(i), t) for i, t in enumerate(chunks)], args.queries, rng)
    calibration = random.Random(args.seed + 1).sample(chunks, min(args.calibration, len(chunks)))
    print(f"{len(chunks)} chunks from {info['files']} files, {len(queries)} queries\n")

    path = embedder_path("default")
    from sentence_transformers import SentenceTransformer

    with torch.no_grad():
        reference = SentenceTransformer(path, device="cpu")
        ref_chunks = embed(reference, chunks)
        ref_top = top10(embed(reference, queries), ref_chunks)
        rows = []
        for label, weights, activations, alpha in SCHEMES:
            start = time.perf_counter()
            model = quantized_model(path, weights, activations, alpha, calibration)
            got_chunks = embed(model, chunks)
            got_top = top10(embed(model, queries), got_chunks)
            recall = np.mean(
                [len(set(a) & set(b)) / 10 for a, b in zip(ref_top, got_top, strict=True)]
            )
            cosine = np.einsum("ij,ij->i", got_chunks, ref_chunks)
            rows.append((label, recall, cosine.mean(), cosine.min()))
            print(f"  {label}: recall@10 {recall:.4f} ({time.perf_counter() - start:.0f} s)")
    print(
        "\n| int8 scheme (fake-quantized, every linear layer) | recall@10 vs fp32 "
        "| cosine mean | cosine min |"
    )
    print("|---|---:|---:|---:|")
    for label, recall, mean, low in rows:
        print(f"| {label} | {recall:.4f} | {mean:.5f} | {low:.5f} |")


if __name__ == "__main__":
    main()
