"""The embedder's transformer as ONNX Runtime graphs, run inside the sentence-transformers
model (tokenizing, pooling and normalizing stay sentence-transformers'):

- **int8** (``DOCENT_EMBED_PRECISION=int8``): fused, then dynamically quantized;
- **fp32**, fused and nothing else: the same vectors as torch (cosine >= 0.9999997), for one
  question at a time. ONNX Runtime's per-call overhead is far below torch eager's, so a
  question embeds in 4.4 ms instead of 7.0 (2-core Xeon, 100 handbook questions, p50); in
  batches torch's fp32 GEMMs were faster (56 against 49 chunks/s), so ingest stays on torch.

Hand-written glue, on purpose: sentence-transformers' own ``backend="onnx"`` needs
``optimum-onnx``, which pins transformers < 4.58 while Docent runs transformers 5 (vLLM and
TRL need it). The pieces are the libraries': ``torch.onnx.export``,
``onnxruntime.transformers.optimizer.optimize_model`` (fuses each layer's attention, the
embeddings' layer norm, the GELUs and the residual layer norms into ONNX Runtime's own
kernels), ``onnxruntime.quantization.quantize_dynamic`` (per-channel int8 weights, as
optimum's ``avx512_vnni`` config; the fused attention becomes ``QAttention``) and an
``InferenceSession``. Fusing first is what makes int8 pay: on a 2-core AVX512 Xeon the unfused
quantized graph embedded 1,437 chunks no faster than torch fp32 (~55 chunks/s), the fused one
at ~85 chunks/s (1.5x). The fusion recognises BERT's attention only in its eager form, so the
export asks transformers for ``attn_implementation="eager"`` (the SDPA form stays unfused).

Each graph is built once per embedder from its local folder (no hub) and cached under
``cache_dir`` behind a file lock, like the converted SmolLM2.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Literal

import torch

from docent.errors import ConfigError
from docent.hardware import cpu_has_int8_dot
from docent.models import build_once

log = logging.getLogger(__name__)

# Bumped whenever the export, fusion or quantization below changes, so stale caches rebuild.
EXPORT_VERSION = "2"
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
OnnxKind = Literal["fp32", "int8"]
MODEL_FILES: dict[OnnxKind, str] = {"fp32": "model_fused.onnx", "int8": "model_int8.onnx"}


def onnx_model_file(model_path: str, cache_dir: Path, kind: OnnxKind) -> Path:
    """The ONNX file of ``kind`` for the embedder at ``model_path`` on this CPU, built on
    first use. For int8, CPUs without an 8-bit dot product get 7-bit weights (ONNX Runtime's
    advice against saturating its u8 x s8 kernels there), so the cache key says which."""
    reduce_range = kind == "int8" and not cpu_has_int8_dot()
    variant = "int8-7bit" if reduce_range else kind
    key = f"{EXPORT_VERSION}:{Path(model_path).resolve()}:{variant}"
    digest = hashlib.sha256(key.encode()).hexdigest()
    target = cache_dir.expanduser() / f"embedder-onnx-{kind}-{digest[:16]}"
    build_once(target, MODEL_FILES[kind], lambda t: _export(model_path, t, kind, reduce_range))
    return target / MODEL_FILES[kind]


def _export(model_path: str, target: Path, kind: OnnxKind, reduce_range: bool) -> None:
    try:
        import onnxruntime  # noqa: F401
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as exc:
        raise ConfigError(
            "the embedder's ONNX path needs onnxruntime and onnx: run `make setup`"
        ) from exc
    import onnx
    from transformers import AutoModel, AutoTokenizer

    log.info("exporting %s to %s ONNX at %s (once)", model_path, kind, target)
    model = AutoModel.from_pretrained(model_path, attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    sample = tokenizer(
        ["a short text", "and a longer one to pad"], padding=True, return_tensors="pt"
    )
    names = [n for n in INPUTS if n in sample]
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".tmp", dir=target.parent))
    try:
        fp32_file = staging / "model_fp32.onnx"
        with torch.no_grad(), warnings.catch_warnings():
            # The tracer warns that shape checks in transformers' mask code become constants:
            # for an encoder they are (no causal mask, no cache), and the tests compare the
            # result with fp32 on texts of many lengths.
            warnings.simplefilter("ignore")
            # The TorchScript exporter (dynamo=False) needs no onnxscript and handles
            # transformers 5's BERT; the wrapper passes inputs by name (positional ones
            # land on the wrong parameters of the new forward signatures).
            torch.onnx.export(
                _ByName(model, names),
                tuple(sample[n] for n in names),
                str(fp32_file),
                input_names=names,
                output_names=["last_hidden_state"],
                dynamic_axes={n: {0: "batch", 1: "tokens"} for n in [*names, "last_hidden_state"]},
                opset_version=17,
                dynamo=False,
            )
        onnx.checker.check_model(str(fp32_file))
        fused_file = _fuse(fp32_file, model.config)
        final = staging / MODEL_FILES[kind]
        if kind == "int8":
            quantize_dynamic(
                str(fused_file),
                str(final),
                weight_type=QuantType.QInt8,
                per_channel=True,
                reduce_range=reduce_range,
                # The matmuls only: an int8 embedding table saves no time (it is a lookup)
                # and cost recall (0.897 against 0.9005 at recall@10 on the bench corpus).
                op_types_to_quantize=["MatMul", "Attention"],
                # shape inference leaves some MatMul outputs untyped in the exported graph
                extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
            )
        elif fused_file != final:
            fused_file.replace(final)
        for f in {fp32_file, fused_file} - {final}:
            f.unlink(missing_ok=True)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _fuse(fp32_file: Path, config: Any) -> Path:
    """``fp32_file`` with ONNX Runtime's BERT fusions applied, saved beside it; ``fp32_file``
    itself for a model that is not BERT (unfused: right, only slower)."""
    from onnxruntime.transformers.optimizer import optimize_model

    heads = getattr(config, "num_attention_heads", 0)
    hidden = getattr(config, "hidden_size", 0)
    if getattr(config, "model_type", "") != "bert" or not heads or not hidden:
        log.warning(
            "ONNX embedder: %r is not BERT; its graph stays unfused (slower)",
            getattr(config, "model_type", None),
        )
        return fp32_file
    fused = optimize_model(str(fp32_file), model_type="bert", num_heads=heads, hidden_size=hidden)
    counts = fused.get_fused_operator_statistics()
    layers = getattr(config, "num_hidden_layers", 0)
    if counts.get("Attention", 0) != layers:
        # Still correct, only slower: say so, as the bench's figures assume the fusion.
        log.warning(
            "ONNX embedder: ONNX Runtime fused %s of %s attention layers; it runs slower",
            counts.get("Attention", 0),
            layers,
        )
    target = fp32_file.with_name("model_fused.onnx")
    fused.save_model_to_file(str(target))
    return target


def run_on_onnx(model: Any, model_file: Path) -> None:
    """Replace the transformer inside the SentenceTransformer ``model`` by ``model_file``
    run on ONNX Runtime; its tokenizer, pooling and normalizing stay as they are."""
    transformer = model[0]
    config = getattr(getattr(transformer, "model", None), "config", None)
    if config is None:
        raise ConfigError(f"{type(transformer).__name__} has no transformer to run on ONNX")
    transformer.model = OnnxEncoder(model_file, config)


class _ByName(torch.nn.Module):
    def __init__(self, model: Any, names: list[str]) -> None:
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *tensors: Any) -> Any:
        return self.model(**dict(zip(self.names, tensors, strict=True))).last_hidden_state


class OnnxEncoder(torch.nn.Module):
    """Stands in for the transformer inside a SentenceTransformer: same inputs, same
    ``last_hidden_state`` output, computed by ONNX Runtime."""

    def __init__(self, model_file: Path, config: Any, threads: int | None = None) -> None:
        import onnxruntime as ort

        super().__init__()
        self.config = config  # sentence-transformers reads the model type from it
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        # Spinning threads would keep the cores busy after each call: torch code run next
        # (the reranker, the generator on the same CPU) took 18 ms instead of 7 on 2 cores.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(
            str(model_file), options, providers=["CPUExecutionProvider"]
        )
        self.inputs = [i.name for i in self.session.get_inputs()]
        # sentence-transformers finds the device from the model's tensors
        self.register_buffer("anchor", torch.zeros(1), persistent=False)

    def forward(self, **features: Any) -> dict[str, Any]:
        feed = {n: features[n].cpu().numpy().astype("int64") for n in self.inputs}
        (hidden,) = self.session.run(["last_hidden_state"], feed)
        return {"last_hidden_state": torch.from_numpy(hidden)}
