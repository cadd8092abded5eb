"""What the model is trained on is what it is served: the prompt tokens of a training row are
the tokens every engine prompts with, the loss covers the answer and its end-of-turn token and
nothing else, and a model trained to near-zero loss on 8 examples gives those 8 answers back
through transformers+PEFT and merged weights (vLLM's greedy words equal PEFT's:
tests/raft/test_train.py). If the overfit test fails, something
between training and serving is broken, whatever the eval says."""

from __future__ import annotations

import pytest

from docent.models import generator_path
from docent.prompts import prompt_ids
from docent.settings import DocentSettings
from ingest.pipeline import refresh_index
from raft.build import build_raft_set
from raft.show import load_examples
from raft.train import make_trainer, to_prompt_completion, train_adapter

from conftest import NO_MODEL_RECIPE, ORBIT_FACTS, run_script, write_corpus, write_qa

FACTS = ORBIT_FACTS
EIGHT = [
    ("When does the Orbit help desk open?", "08:30", "desk.md",
     "The Orbit help desk opens at 08:30 on weekdays."),
    ("How fast are Orbit tickets answered?", "within 3 working days", "desk.md",
     "Tickets are answered within 3 working days."),
    ("How much is an Orbit lab badge?", "12 EUR per year", "lab.md",
     "The Orbit lab badge costs 12 EUR per year."),
    ("How soon is a lost Orbit badge replaced?", "within 2 days", "lab.md",
     "Lost badges are replaced within 2 days."),
    ("How often are Orbit fleet cars serviced?", "every 15000 km", "fleet.md",
     "Orbit fleet cars are serviced every 15000 km."),
    ("Which Orbit trips need approval?", "longer than 400 km", "fleet.md",
     "Trips longer than 400 km need approval."),
    ("When does the Orbit canteen serve lunch?", "from 11:45", "canteen.md",
     "The Orbit canteen serves lunch from 11:45."),
    ("How much does an Orbit canteen meal cost?", "6 EUR", "canteen.md", "A meal costs 6 EUR."),
]


@pytest.fixture(scope="module")
def eight(tmp_path_factory, embedder) -> DocentSettings:
    """Eight human questions, all in the training split, each with its oracle + 1 distractor."""
    root = tmp_path_factory.mktemp("parity")
    settings = DocentSettings(
        workspace=root / "ws", raft_distractors=1, top_k=2, raft_split=(1.0, 0.0, 0.0),
        raft_refusal_fraction=0.0, raft_p_oracle=1.0, **NO_MODEL_RECIPE,
    )
    refresh_index([write_corpus(root / "docs", FACTS)], settings, embedder=embedder)
    build_raft_set(settings, qa_file=write_qa(root / "qa.jsonl", EIGHT), name="eight", limit=0,
                   embedder=embedder)
    return settings


def _records(settings: DocentSettings) -> list[dict]:
    return load_examples(settings.workspace / "raft" / "eight", "train")


def test_training_rows_are_the_served_prompt_then_the_answer_and_eos(eight, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from docent.engine import ChatRequest
    from docent.engine.hf import HFEngine

    path = generator_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    records = _records(eight)
    assert len(records) == 8
    rows = [to_prompt_completion(r, tokenizer) for r in records]
    trainer = make_trainer(eight, AutoModelForCausalLM.from_pretrained(path), tokenizer, rows,
                           [], tmp_path)
    engine = HFEngine(path)  # its own prompt rendering, as it serves
    for record, row in zip(records, trainer.train_dataset, strict=True):
        ids, labels = row["input_ids"], row["labels"]
        n_prompt = next(i for i, label in enumerate(labels) if label != -100)
        served = prompt_ids(tokenizer, record["messages"][:-1])
        engine_prompt = engine.tokenizer(
            engine._prompt(ChatRequest(record["messages"][:-1])), add_special_tokens=False
        )["input_ids"]
        assert ids[:n_prompt] == served == engine_prompt
        answer = tokenizer.encode(record["messages"][-1]["content"], add_special_tokens=False)
        # The loss covers the answer and the end-of-turn token, and nothing else.
        assert labels[n_prompt:] == ids[n_prompt:] == [*answer, tokenizer.eos_token_id]
        assert tokenizer.eos_token == "<|im_end|>"
    # Padding with the EOS id must not hide the real EOS from the loss in a batch.
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    for row_ids, row_labels in zip(batch["input_ids"], batch["labels"], strict=True):
        real = [i for i, label in enumerate(row_labels.tolist()) if label != -100]
        assert row_labels[real[-1]] == tokenizer.eos_token_id == row_ids[real[-1]]




@pytest.mark.slow
def test_a_model_trained_to_near_zero_loss_says_its_answers_back(eight):
    from docent.engine import ChatRequest
    from docent.engine.hf import HFEngine

    result = train_adapter(
        eight.with_overrides(train_max_steps=8, train_lr=3e-3, train_batch_size=8,
                             train_lora_dropout=0.0, train_eval_steps=1000),
        dataset="eight", name="eight", merge=True,
    )
    assert result.train_loss_last < 0.05, result.log_history
    records = _records(eight)
    targets = [r["messages"][-1]["content"].strip() for r in records]
    folder = eight.workspace / "adapters" / "eight"

    def reproduced(texts: list[str]) -> int:
        return sum(t.strip() == want for t, want in zip(texts, targets, strict=True))

    peft = HFEngine(generator_path(), dtype="float32")
    peft.add_adapter("eight", str(folder))
    asks = [ChatRequest(r["messages"][:-1], max_tokens=96, adapter="eight") for r in records]
    assert reproduced([c.text for c in peft.generate(asks)]) >= 7
    merged = HFEngine(str(folder / "merged"), dtype="float32")
    plain = [ChatRequest(r["messages"][:-1], max_tokens=96) for r in records]
    assert reproduced([c.text for c in merged.generate(plain)]) >= 7
    # The quote guard holds every quote to the sources it is given, whatever the model learnt
    # to write. (That it leaves quotes of the given documents as they are is checked through
    # vLLM below, with the same guard: one pass less of transformers' slow CPU decoding.)
    _assert_quotes_from(ELSEWHERE, [c.text for c in merged.generate(_guarded(records, ELSEWHERE))])


ELSEWHERE = ("Orbit visitors sign in at the front office and wear a red lanyard. "
             "Parking permits for the Orbit garage are issued every January.")


def _guarded(records: list[dict], sources: str) -> list:
    """Requests whose quotes are held to ``sources``."""
    from docent.engine import ChatRequest

    return [ChatRequest(r["messages"][:-1], max_tokens=96, quote_sources=[sources])
            for r in records]


def _assert_quotes_from(source: str, texts: list[str]) -> None:
    from docent.prompts import parse_answer
    from eval.metrics import quote_found

    quotes = [q for t in texts for q in parse_answer(t).quotes]
    assert sum(1 for t in texts if parse_answer(t).quotes) >= 6, texts  # the model still quotes
    assert all(quote_found(q, [source]) for q in quotes), texts


VLLM_GUARD = """
import json, sys
from docent.engine import ChatRequest
from docent.engine.vllm_engine import VLLMEngine

if __name__ == "__main__":
    records, elsewhere = json.loads(sys.argv[2]), sys.argv[3]
    engine = VLLMEngine(sys.argv[1], max_model_len=2048, kv_cache_gib=1, enable_lora=False,
                        dtype="float32", enforce_eager=True)
    out = {}
    for label, sources in (("plain", None), ("own", "own"), ("elsewhere", elsewhere)):
        asks = [ChatRequest(m, max_tokens=96, quote_sources=(
                    [] if sources is None else [m[-1]["content"] if sources == "own" else sources]))
                for m in records]
        out[label] = [c.text for c in engine.generate(asks)]
    print("RESULT " + json.dumps(out))
    engine.close()
"""


@pytest.mark.slow
def test_vllm_holds_quotes_to_their_sources_like_transformers(eight, tmp_path):
    """The guard runs inside vLLM's engine process (a logits processor loaded by name):
    the same overfit model, served merged, keeps its answers and quotes only the sources."""
    import json

    folder = eight.workspace / "adapters" / "eight" / "merged"
    if not folder.exists():
        pytest.skip("needs the merged model from the overfit test")
    records = _records(eight)
    targets = [r["messages"][-1]["content"].strip() for r in records]
    out = run_script(tmp_path, VLLM_GUARD, str(folder),
                     json.dumps([r["messages"][:-1] for r in records]), ELSEWHERE)
    for label in ("plain", "own"):
        assert sum(t == w for t, w in zip(out[label], targets, strict=True)) >= 7, out[label]
    _assert_quotes_from(ELSEWHERE, out["elsewhere"])
