"""The generation engines on the real SmolLM2: batching, greedy agreement, vLLM on CPU."""

from __future__ import annotations

import json

import pytest

from docent.engine import ChatRequest, build_engine
from docent.settings import DocentSettings

from conftest import run_script

QUESTIONS = [
    "What is the capital of France?",
    "Name a colour of the sky on a clear day.",
    "What is two plus two? Answer with a number.",
]


def _requests(max_tokens: int = 16) -> list[ChatRequest]:
    return [ChatRequest([{"role": "user", "content": q}], max_tokens=max_tokens) for q in QUESTIONS]


@pytest.fixture(scope="module")
def hf_engine():
    return build_engine(DocentSettings(engine="hf", gen_batch_size=8))


def test_hf_batched_greedy_equals_one_at_a_time(hf_engine):
    batched = hf_engine.generate(_requests())
    single = [hf_engine.generate([r])[0] for r in _requests()]
    assert [c.text for c in batched] == [c.text for c in single]
    assert "Paris" in batched[0].text
    for c in batched:
        assert 0 < c.completion_tokens <= 16 and c.prompt_tokens > 5
        assert c.finish_reason in ("stop", "length")
        assert c.model == "HuggingFaceTB/SmolLM2-135M-Instruct"  # a name, never a path


def test_hf_stop_strings_and_length_limit(hf_engine):
    long = hf_engine.generate(
        [ChatRequest([{"role": "user", "content": "Count from 1 to 50."}], max_tokens=8)]
    )[0]
    assert long.finish_reason == "length" and long.completion_tokens == 8
    stopped = hf_engine.generate(
        [
            ChatRequest(
                [{"role": "user", "content": "Count from 1 to 50, separated by commas."}],
                max_tokens=40,
                stop=["5"],
            )
        ]
    )[0]
    assert "5" not in stopped.text


def test_auto_engine_prefers_a_url_then_vllm_where_it_runs_fast(monkeypatch):
    from docent.engine import factory, resolve_engine_kind

    assert resolve_engine_kind(DocentSettings(llm_url="http://127.0.0.1:1/v1")) == "openai"
    assert resolve_engine_kind(DocentSettings(engine="hf")) == "hf"
    # vLLM is installed by make setup; auto takes it on CUDA and AVX512 CPUs only.
    monkeypatch.setattr(factory, "vllm_runs_fast", lambda: True)
    assert resolve_engine_kind(DocentSettings()) == "vllm"
    monkeypatch.setattr(factory, "vllm_runs_fast", lambda: False)
    assert resolve_engine_kind(DocentSettings()) == "hf"
    assert resolve_engine_kind(DocentSettings(engine="vllm")) == "vllm"  # asked for: honoured


VLLM_SCRIPT = """
import json, sys
from docent.engine import ChatRequest, build_engine
from docent.settings import DocentSettings

if __name__ == "__main__":
    questions = json.loads(sys.argv[1])
    # fp32 like the transformers engine: in bf16 (vLLM's choice on CPUs with bf16 instructions)
    # an Intel Xeon with AMX answered the first question "L'Etoile, la Marseillaise, la femme,"
    # where fp32 says Paris, so the comparison would measure rounding, not vLLM. The bf16 path
    # is what test_vllm_server, test_parity and test_engine_streaming run.
    engine = build_engine(DocentSettings(engine="vllm", vllm_kv_cache_gib=1, max_model_len=2048,
                                         dtype="float32"))
    out = engine.generate([ChatRequest([{"role": "user", "content": q}], max_tokens=16)
                           for q in questions])
    print("RESULT " + json.dumps([[c.text, c.completion_tokens, c.prompt_tokens] for c in out]))
    engine.close()
"""


@pytest.mark.slow
def test_vllm_cpu_engine_generates_like_transformers(hf_engine, tmp_path):
    vllm_out = run_script(tmp_path, VLLM_SCRIPT, json.dumps(QUESTIONS))
    hf_out = hf_engine.generate(_requests())
    assert "Paris" in vllm_out[0][0]
    for (text, n_new, n_prompt), hf in zip(vllm_out, hf_out, strict=True):
        assert text and 0 < n_new <= 16
        assert n_prompt == hf.prompt_tokens  # same chat template, same tokens
    # Greedy decoding agrees up to numerics (other kernels, same fp32): same first words.
    agree = sum(
        t.split()[:3] == h.text.split()[:3] for (t, _, _), h in zip(vllm_out, hf_out, strict=True)
    )
    print("vllm:", [t for t, _, _ in vllm_out], "hf:", [h.text for h in hf_out])
    assert agree >= 2
