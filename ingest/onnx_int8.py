"""The embedder's int8 path: an ONNX export of its transformer, dynamically quantized, run by
ONNX Runtime inside the sentence-transformers model (tokenizing, pooling and normalizing stay
sentence-transformers').

Hand-written glue, on purpose: sentence-transformers' own ``backend="onnx"`` needs
``optimum-onnx``, which pins transformers < 4.58 while Docent runs transformers 5 (vLLM and
TRL need it). The pieces are the libraries': ``torch.onnx.export``,
``onnxruntime.quantization.quantize_dynamic`` (per-channel int8 weights, as optimum's
``avx512_vnni`` config) and an ``InferenceSession``.

The quantized model is built once per embedder from its local folder (no hub) and cached
under ``cache_dir`` behind a file lock, like the converted SmolLM2.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from docent.errors import ConfigError
from docent.models import build_once

log = logging.getLogger(__name__)

# Bumped whenever the export or the quantization below changes, so stale caches are rebuilt.
EXPORT_VERSION = "1"
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
MODEL_FILE = "model_int8.onnx"


def int8_model_file(model_path: str, cache_dir: Path) -> Path:
    """The quantized ONNX file for the embedder at ``model_path``, built on first use."""
    digest = hashlib.sha256(f"{EXPORT_VERSION}:{Path(model_path).resolve()}".encode()).hexdigest()
    target = cache_dir.expanduser() / f"embedder-onnx-int8-{digest[:16]}"
    build_once(target, MODEL_FILE, lambda t: _export_quantized(model_path, t))
    return target / MODEL_FILE


def _export_quantized(model_path: str, target: Path) -> None:
    try:
        import onnxruntime  # noqa: F401
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as exc:
        raise ConfigError(
            "DOCENT_EMBED_PRECISION=int8 needs onnxruntime and onnx: run `make setup`"
        ) from exc
    import onnx
    from transformers import AutoModel, AutoTokenizer

    log.info("exporting %s to int8 ONNX at %s (once)", model_path, target)
    model = AutoModel.from_pretrained(model_path).eval()
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
        quantize_dynamic(
            str(fp32_file),
            str(staging / MODEL_FILE),
            weight_type=QuantType.QInt8,
            per_channel=True,
            # shape inference leaves some MatMul outputs untyped in the exported graph
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
        fp32_file.unlink()
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


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
