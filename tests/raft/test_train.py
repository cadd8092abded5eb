"""docent train on the real SmolLM2: packing is exact, loss falls, resume works, the adapter
loads in transformers+PEFT and vLLM, and the registry promotes and rolls back."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from docent.errors import ConfigError
from docent.models import generator_id, generator_path
from docent.settings import DocentSettings
from ingest.pipeline import refresh_index
from raft.adapters import METADATA, AdapterError, AdapterRegistry
from raft.build import build_raft_set
from raft.rehearsal import rehearsal_count
from raft.train import TRAINING, train_adapter

from conftest import (
    NO_MODEL_RECIPE,
    ORBIT_FACTS,
    ORBIT_QA,
    run_script,
    write_corpus,
    write_qa,
)

FACTS = ORBIT_FACTS
QA = ORBIT_QA


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory, embedder) -> DocentSettings:
    """A small RAFT set (human questions, short chunks) so training steps take seconds."""
    root = tmp_path_factory.mktemp("train")
    corpus = write_corpus(root / "docs", FACTS)
    qa = write_qa(root / "qa.jsonl", QA)
    settings = DocentSettings(
        workspace=root / "ws",
        raft_distractors=2,
        top_k=3,
        raft_split=(0.5, 0.25, 0.25),
        raft_refusal_fraction=0.0,
        **NO_MODEL_RECIPE,
    )
    refresh_index([corpus], settings, embedder=embedder)

    # Human questions only (limit=0): no teacher is built or called.
    build_raft_set(settings, qa_file=qa, name="tiny", limit=0, embedder=embedder)
    return settings.with_overrides(
        train_max_steps=4,
        train_eval_steps=2,
        train_lr=2e-3,
        train_batch_size=2,
        train_max_length=1024,
    )


def test_packed_sequences_attend_only_within_themselves():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(generator_path()).eval()
    a = torch.tensor([[1, 422, 3512, 314, 2765, 30, 216, 1025]])
    b = torch.tensor([[1, 3853, 2630, 28, 1341, 42]])
    with torch.no_grad():
        alone_a = model(a).logits
        alone_b = model(b).logits
        packed = torch.cat([a, b], dim=1)
        positions = torch.cat([torch.arange(a.shape[1]), torch.arange(b.shape[1])])[None]
        # use_cache=False as in training (TRL sets it): with a KV cache, transformers does not
        # derive the packed-sequence mask from position ids.
        together = model(packed, position_ids=positions, use_cache=False).logits
    assert torch.allclose(together[:, : a.shape[1]], alone_a, atol=1e-4)
    assert torch.allclose(together[:, a.shape[1] :], alone_b, atol=1e-4)


def test_qlora_without_cuda_says_it_needs_a_gpu(tiny_set):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        train_adapter(tiny_set.with_overrides(train_qlora=True), dataset="tiny")


def test_interrupted_training_resumes_and_the_adapter_works(tiny_set):
    from transformers import TrainerCallback

    class Interrupt(Exception):
        pass

    class StopAtThree(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 3:
                raise Interrupt

    with pytest.raises(Interrupt):
        train_adapter(tiny_set, dataset="tiny", name="orbit", callbacks=[StopAtThree()])
    assert (tiny_set.workspace / "adapters" / ".runs" / TRAINING).exists()
    result = train_adapter(tiny_set, resume=True, merge=True)
    assert result.name == "orbit" and result.resumed_from.endswith("checkpoint-2")
    assert result.steps == 4
    assert result.train_loss_last < result.train_loss_first
    assert result.tokens_per_s > 0

    folder = tiny_set.workspace / "adapters" / "orbit"
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "tokenizer.json",
        "report.md",
        "loss.png",
        "merged/model.safetensors",
    ):
        assert (folder / name).exists(), name
    meta = json.loads((folder / METADATA).read_text())
    assert meta["base_model"] == generator_id() and meta["dataset"] == "tiny"
    assert len(meta["dataset_hash"]) == 64 and meta["hyperparameters"]["train_lora_r"] == 16
    assert any("eval_loss" in h for h in meta["loss_curve"])
    assert "| step |" in (folder / "report.md").read_text()

    from docent.engine import ChatRequest
    from docent.engine.hf import HFEngine

    engine = HFEngine(generator_path())
    engine.add_adapter("orbit", str(folder))
    ask = [{"role": "user", "content": "When does the Orbit help desk open?"}]
    tuned = engine.generate([ChatRequest(ask, max_tokens=24, adapter="orbit")])[0]
    base = engine.generate([ChatRequest(ask, max_tokens=24)])[0]
    assert tuned.text and base.text and tuned.adapter == "orbit" and base.adapter is None
    merged = HFEngine(str(folder / "merged")).generate([ChatRequest(ask, max_tokens=24)])[0]
    assert merged.text.split()[:3] == tuned.text.split()[:3]  # merged = base + adapter


def test_packed_padding_free_training_runs(tiny_set):
    result = train_adapter(
        tiny_set.with_overrides(train_packing=True, train_max_steps=2),
        dataset="tiny",
        name="packed",
    )
    assert result.steps == 2 and result.train_loss_first is not None
    assert (tiny_set.workspace / "adapters" / "packed" / "adapter_model.safetensors").exists()


VLLM_ADAPTER = """
import json, sys
from pathlib import Path
from docent.engine import ChatRequest
from docent.settings import DocentSettings
from raft.adapters import AdapterRegistry
from raft.merge import engine_for_adapter

if __name__ == "__main__":
    settings = DocentSettings(workspace=sys.argv[1], engine="vllm", vllm_kv_cache_gib=1,
                              max_model_len=2048, dtype="float32")
    info = AdapterRegistry(Path(sys.argv[1]) / "adapters").get("orbit")
    engine, adapter = engine_for_adapter(settings, info)
    ask = [{"role": "user", "content": "When does the Orbit help desk open?"}]
    out = engine.generate([ChatRequest(ask, max_tokens=24, adapter=adapter)])
    print("RESULT " + json.dumps([out[0].text, adapter]))
    engine.close()
"""


@pytest.mark.slow
def test_vllm_answers_with_the_trained_adapter_like_peft(tiny_set, tmp_path):
    """vLLM runs the adapter as LoRA on CUDA and as merged weights on CPUs (its CPU LoRA path
    timed out); either way its greedy answer is PEFT's, in fp32."""
    from docent.engine import ChatRequest
    from docent.engine.factory import merges_adapters
    from docent.engine.hf import HFEngine

    folder = tiny_set.workspace / "adapters" / "orbit"
    if not folder.exists():
        pytest.skip("needs the adapter from the training test")
    shutil.rmtree(folder / "merged")  # written by --merge above: make the engine write it
    text, adapter = run_script(tmp_path, VLLM_ADAPTER, str(tiny_set.workspace))
    engine = HFEngine(generator_path(), dtype="float32")
    engine.add_adapter("orbit", str(folder))
    ask = [{"role": "user", "content": "When does the Orbit help desk open?"}]
    peft = engine.generate([ChatRequest(ask, max_tokens=24, adapter="orbit")])[0]
    assert text.split()[:6] == peft.text.split()[:6]
    merged = merges_adapters("vllm")
    assert (adapter is None) == merged and (folder / "merged" / "config.json").exists() == merged


def test_warm_up_never_spends_a_short_run_at_learning_rate_zero(tiny_set):
    from raft.train import _warmup_steps

    assert _warmup_steps(tiny_set.with_overrides(train_max_steps=1), 100) == 0
    assert _warmup_steps(tiny_set.with_overrides(train_max_steps=4), 100) == 0
    assert _warmup_steps(tiny_set.with_overrides(train_max_steps=40), 100) == 2
    epochs = DocentSettings(train_epochs=2.0, train_batch_size=4, train_grad_accum=1)
    assert _warmup_steps(epochs, 400) == 10  # 100 steps an epoch, 200 in all


def _fake_adapter(registry_dir, name, base):
    folder = registry_dir / name
    folder.mkdir(parents=True)
    (folder / METADATA).write_text(json.dumps({"name": name, "base_model": base}))


def test_registry_promote_rollback_and_base_mismatch(tmp_path):
    registry = AdapterRegistry(tmp_path / "adapters")
    _fake_adapter(registry.dir, "a", generator_id())
    _fake_adapter(registry.dir, "b", generator_id())
    _fake_adapter(registry.dir, "other", "meta-llama/Llama-3.1-8B-Instruct")
    assert registry.promoted() is None
    registry.promote("a", "default")
    registry.promote("b", "default")
    assert registry.promoted().name == "b"
    assert [a.name for a in registry.list() if a.promoted] == ["b"]
    assert registry.rollback().name == "a"
    assert registry.rollback() is None
    with pytest.raises(AdapterError, match="nothing to roll back"):
        registry.rollback()
    with pytest.raises(AdapterError, match="was trained on"):
        registry.promote("other", "default")
    with pytest.raises(AdapterError, match="known: a, b, other"):
        registry.get("nope")
    registry.update_metadata("a", eval={"accuracy": 0.5})
    assert registry.get("a").metadata["eval"] == {"accuracy": 0.5}


def test_training_mixes_in_rehearsal_and_caches_it(tiny_set):
    settings = tiny_set.with_overrides(train_max_steps=1, train_rehearsal=0.4)
    result = train_adapter(settings, dataset="tiny", name="rehearsed")
    meta = json.loads((tiny_set.workspace / "adapters" / "rehearsed" / "metadata.json").read_text())
    want = rehearsal_count(meta["examples"]["train"], 0.4)
    assert result.steps == 1 and meta["examples"]["rehearsal"] == want > 0
    assert meta["hyperparameters"]["train_rehearsal"] == 0.4
    cache = tiny_set.workspace / "raft" / "cache" / "rehearsal.jsonl"
    rows = [json.loads(line) for line in cache.read_text().splitlines()]
    assert len(rows) == want
    for row in rows:
        assert "?" in row["request"] and row["answer"].strip()
        assert row["key"]["generator"] and row["key"]["seed"] == settings.seed
    # A second run takes the cached pairs: nothing new is written.
    train_adapter(settings, dataset="tiny", name="rehearsed-again")
    assert cache.read_text().splitlines() == [json.dumps(r) for r in rows]


def test_a_checkpoint_cut_off_while_written_is_not_resumed_from(tmp_path):
    from raft.train import last_complete_checkpoint

    for step in (2, 4, 6):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "adapter_model.safetensors").write_bytes(b"x")
    for step in (2, 4):  # checkpoint-6 was being written when the process was killed
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-4")
    assert not (tmp_path / "checkpoint-6").exists()
    assert last_complete_checkpoint(tmp_path / "none") is None


@pytest.mark.parametrize("name", ["../adapters", "a/b", ".", "x" * 300, "\u1e70\u033a" * 80])
def test_a_name_that_is_no_folder_name_is_no_adapter(tmp_path, name):
    """Names come from requests: one with a separator, "..", or too long for a file name is
    "no adapter named …" (a 4xx in the API), never a read outside the registry or an OSError."""
    registry = AdapterRegistry(tmp_path / "adapters")
    (tmp_path / METADATA).write_text("{}")  # what "../adapters" would have found
    with pytest.raises(AdapterError, match="no adapter named"):
        registry.get(name)
