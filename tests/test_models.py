"""Model registry: the embedded models resolve offline; SmolLM2 is converted once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from docent import models
from docent.errors import ModelNotFoundError


def test_default_embedder_is_the_packaged_minilm():
    path = Path(models.embedder_path())
    assert (path / "config.json").exists() and (path / "modules.json").exists()
    assert models.embedder_id() == "sentence-transformers/all-MiniLM-L6-v2"
    assert models.embedder_path("all-MiniLM-L6-v2") == str(path)


def test_explicit_models_resolve_to_folders_or_pass_through(tmp_path):
    folder = tmp_path / "my-model"
    folder.mkdir()
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        models.embedder_path(str(folder))
    (folder / "config.json").write_text("{}")
    assert models.embedder_path(str(folder)) == str(folder.resolve())
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        models.generator_path("./no/such/model")
    assert models.generator_path("org/some-model") == "org/some-model"


def test_embedded_smollm2_is_converted_once_and_generates(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(models.generator_path("default", cache_dir=tmp_path))
    assert path.parent == tmp_path
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (path / name).exists(), name
    assert json.loads((path / "config.json").read_text())["model_type"] == "llama"
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert Path(models.generator_path("default", cache_dir=tmp_path)) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp  # cached, not redone
    assert not list(tmp_path.glob(".convert-*"))

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0][inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
