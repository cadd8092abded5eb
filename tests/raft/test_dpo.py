"""Preference pairs and DPO on the real SmolLM2: outputs are judged wrong / ungrounded /
not declining against verified targets, feedback in a real serving store becomes pairs, and
one short DPO run (interrupted and resumed) starts from the SFT adapter, uses it as the
reference and saves a registered adapter of the same shape.

The engine that answers for pair building is scripted: what it says is the input under
test, and real generation would cost minutes on a 2-core CPU (the DPO run is real)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from safetensors.torch import load_file

from docent.engine import ChatRequest, Completion, Engine
from docent.errors import ConfigError
from docent.prompts import build_messages, decline_answer, format_answer, quote
from docent.settings import DocentSettings
from ingest.pipeline import refresh_index
from raft import show
from raft.adapters import METADATA, AdapterRegistry
from raft.build import build_raft_set
from raft.dpo import DPO_TRAINING, PAIRS_FILE, train_dpo
from raft.preferences import (
    auto_pairs,
    context_texts,
    feedback_pairs,
    judge,
    load_pairs,
    model_wrong_answer,
    write_pairs,
)
from raft.train import train_adapter
from serving.store import ServingStore

from conftest import NO_MODEL_RECIPE, ORBIT_FACTS, ORBIT_QA, write_corpus, write_qa

QA = [ORBIT_QA[i] for i in (0, 1, 2, 5)]
DESK = "The Orbit help desk opens at 08:30 on weekdays."


class ScriptedEngine(Engine):
    """Answers each request with ``script(request)`` and keeps the requests."""

    kind = "scripted"
    model = "scripted"

    def __init__(self, script: Callable[[ChatRequest], str]) -> None:
        self.script = script
        self.requests: list[ChatRequest] = []

    def generate(self, requests: Sequence[ChatRequest], progress=None) -> list[Completion]:
        self.requests += requests
        return [Completion(self.script(r), 10, 10, "stop", self.model, r.adapter) for r in requests]


@dataclass
class Doc:
    text: str
    source: str


@pytest.fixture(scope="module")
def orbit(tmp_path_factory, embedder) -> DocentSettings:
    """Every Orbit document in train, some refusal examples, one short SFT step ("sft")."""
    root = tmp_path_factory.mktemp("dpo")
    settings = DocentSettings(
        workspace=root / "ws",
        raft_distractors=1,
        top_k=2,
        raft_split=(1.0, 0.0, 0.0),
        raft_refusal_fraction=0.5,
        train_max_steps=1,
        train_batch_size=2,
        train_lr=2e-3,
        train_max_length=512,
        # No dropout: the policy's first forward pass then equals the reference's exactly.
        train_lora_dropout=0.0,
        **NO_MODEL_RECIPE,
    )
    refresh_index([write_corpus(root / "docs", ORBIT_FACTS)], settings, embedder=embedder)
    build_raft_set(
        settings, qa_file=write_qa(root / "qa.jsonl", QA), name="orbit", limit=0, embedder=embedder
    )
    train_adapter(settings, dataset="orbit", name="sft")
    return settings


def _raft(settings: DocentSettings) -> Path:
    return settings.workspace / "raft" / "orbit"


# Judging ------------------------------------------------------------------------------------
def test_outputs_are_judged_against_the_verified_target():
    prompt = build_messages(
        "When does the Orbit help desk open?", [Doc(ORBIT_FACTS["desk.md"], "desk.md")]
    )
    context = context_texts(prompt)
    assert len(context) == 1 and DESK in context[0]
    target = format_answer(quote(DESK), "08:30")
    golds = ["08:30"]

    def origin(output: str, kind: str = "oracle", target: str = target) -> str | None:
        return judge(output, target, golds, kind, context)

    assert origin(format_answer(quote(DESK), "09:00")) == "auto:wrong"
    assert origin(decline_answer()) == "auto:wrong"
    assert origin("It is probably open in the afternoon.") == "auto:wrong"
    assert origin(format_answer(quote("The desk opens at 08:30 sharp."), "08:30")) == (
        "auto:ungrounded"
    )
    assert origin("<ANSWER>: 08:30") == "auto:ungrounded"  # the target quotes, this does not
    assert origin(format_answer(quote(DESK), "at 08:30")) is None
    assert origin(target) is None
    # A RAFT example without its oracle quotes a sentence the context lacks: only the
    # answer is held to it.
    no_oracle = format_answer(quote("A meal costs 6 EUR."), "08:30")
    assert origin("<ANSWER>: 08:30", "no_oracle", no_oracle) is None
    assert origin("<ANSWER>: 08:30", "refusal", decline_answer()) == "auto:refusal"
    assert origin(decline_answer(), "refusal", decline_answer()) is None


def test_auto_pairs_from_a_raft_set(orbit):
    records = show.load_examples(_raft(orbit), "train")
    kinds = [r["meta"]["kind"] for r in records]
    assert "refusal" in kinds and "oracle" in kinds

    wrong = ScriptedEngine(lambda r: "The documents say 42.\n<ANSWER>: 42")
    every_kind = orbit.with_overrides(dpo_auto_kinds=["wrong", "ungrounded", "refusal"])
    pairs, skipped = auto_pairs(every_kind, _raft(orbit), wrong, "sft", max_tokens=64)
    assert not skipped and len(pairs) == len(records)
    assert [p["id"] for p in pairs] == [f"auto-{r['id']}" for r in records]  # file order
    for pair, record, request in zip(pairs, records, wrong.requests, strict=True):
        assert request.messages == pair["prompt"] == record["messages"][:-1]
        assert request.adapter == "sft" and request.temperature == 0.0
        assert request.max_tokens == 64
        assert pair["chosen"] == record["messages"][-1]["content"]
        assert pair["rejected"] == "The documents say 42.\n<ANSWER>: 42"
        assert pair["question"] == record["meta"]["question"]
        want = "auto:refusal" if record["meta"]["kind"] == "refusal" else "auto:wrong"
        assert pair["origin"] == want

    # By default an answer to a refusal example makes no pair (it taught declining answerable
    # questions on the handbook); the answerable ones still do.
    pairs, skipped = auto_pairs(orbit, _raft(orbit), wrong, "sft", max_tokens=64)
    assert skipped == {"refusal_not_used": kinds.count("refusal")}
    assert {p["origin"] for p in pairs} == {"auto:wrong"}
    assert len(pairs) == len(records) - kinds.count("refusal")

    right = ScriptedEngine(
        lambda r: next(
            x["messages"][-1]["content"] for x in records if x["messages"][:-1] == r.messages
        )
    )
    pairs, skipped = auto_pairs(orbit, _raft(orbit), right, None)
    assert pairs == [] and skipped == {"correct": len(records)}

    capped = every_kind.with_overrides(dpo_max_pairs=2)
    pairs, skipped = auto_pairs(capped, _raft(orbit), wrong, None)
    assert len(pairs) == 2 and skipped["over_max_pairs"] == len(records) - 2


def test_feedback_pairs_from_a_serving_store(orbit, tmp_path):
    folder = tmp_path / "serving"
    assert feedback_pairs(folder, _raft(orbit)) == ([], {})
    store = ServingStore(folder)
    chunks = [
        {"chunk_id": "d", "source": "desk.md", "text": ORBIT_FACTS["desk.md"]},
        {"chunk_id": "l", "source": "lab.md", "text": ORBIT_FACTS["lab.md"]},
    ]

    def answer(question: str, text: str, reasoning: str = "", kind: str = "ask") -> str:
        return store.save_answer(
            kind=kind,
            question=question,
            answer=text,
            reasoning=reasoning,
            declined=False,
            citations=[],
            chunks=chunks,
            model="m",
            adapter="sft",
        )

    desk = answer("when does the Orbit help desk  open?", "09:00", quote(DESK))
    badge = answer("How fast are lost Orbit badges replaced?", "at once")
    unknown = answer("Who runs the Orbit help desk?", "Alice")
    upvoted = answer(
        "How much is an Orbit lab badge?",
        "12 EUR per year",
        quote("The Orbit lab badge costs 12 EUR per year."),
    )
    chat = answer("And the desk?", "09:00", kind="chat:tutor")
    store.add_feedback(desk, -1, "08:30", None)
    store.add_feedback(badge, -1, "within 2 days", None)
    store.add_feedback(unknown, -1, "Bob", None)
    store.add_feedback(upvoted, 1, None, None)
    store.add_feedback(chat, -1, "08:30", None)
    store.add_feedback(unknown, -1, None, "no idea")  # the latest rating of an answer counts
    store.close()

    def script(r: ChatRequest) -> str:
        return "<ANSWER>: 12 EUR per year" if r.temperature == 0 else "<ANSWER>: 30 EUR"

    engine = ScriptedEngine(script)
    wrong = model_wrong_answer(engine, "sft", max_tokens=32, seed=7)
    pairs, skipped = feedback_pairs(folder, _raft(orbit), wrong_answer=wrong)
    assert skipped == {"prompt_not_reproducible": 1, "downvote_without_correction": 1}
    by_question = {p["question"]: p for p in pairs}
    docs = [Doc(c["text"], c["source"]) for c in chunks]

    fixed = by_question["when does the Orbit help desk  open?"]
    assert fixed["origin"] == "feedback:correction"
    assert fixed["prompt"] == build_messages("when does the Orbit help desk  open?", docs)
    assert fixed["rejected"] == format_answer(quote(DESK), "09:00")  # as the model wrote it
    raft_target = next(
        r["messages"][-1]["content"]
        for r in show.load_examples(_raft(orbit), "train")
        if r["meta"]["question"] == QA[0][0] and r["meta"]["kind"] == "oracle"
    )
    assert fixed["chosen"] == raft_target  # the same question's verified RAFT target

    built = by_question["How fast are lost Orbit badges replaced?"]
    assert built["rejected"] == "at once"  # no <ANSWER>: line: the output was kept whole
    assert quote("Lost badges are replaced within 2 days.") in built["chosen"]
    assert built["chosen"].endswith("<ANSWER>: within 2 days")

    up = by_question["How much is an Orbit lab badge?"]
    assert up["origin"] == "feedback:upvote"
    assert up["chosen"] == format_answer(
        quote("The Orbit lab badge costs 12 EUR per year."), "12 EUR per year"
    )
    assert up["rejected"] == "<ANSWER>: 30 EUR"  # greedy was right, the first sample wrong
    assert [(r.temperature, r.seed) for r in engine.requests] == [(0.0, None), (1.0, 7)]

    store = ServingStore(folder)
    store.add_feedback(unknown, -1, "Bob", None)
    store.close()
    pairs, skipped = feedback_pairs(folder, None)
    assert skipped == {
        "prompt_not_reproducible": 1,
        "correction_not_in_context": 1,
        "no_wrong_answer_source": 1,
    }
    assert len(pairs) == 2

    path = tmp_path / "pairs.jsonl"
    digest = write_pairs(pairs, path)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert load_pairs(path) == pairs
    path.write_text(json.dumps({**pairs[0], "origin": "vibes"}) + "\n")
    with pytest.raises(ConfigError, match="origin 'vibes'"):
        load_pairs(path)


# Training -----------------------------------------------------------------------------------
def test_dpo_starts_from_the_sft_adapter_and_resumes(orbit):
    from transformers import TrainerCallback

    class Interrupt(Exception):
        pass

    class StopAtTwo(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 1:
                raise Interrupt

    wrong = ScriptedEngine(lambda r: "The documents say 42.\n<ANSWER>: 42")
    pairs, _ = auto_pairs(orbit, _raft(orbit), wrong, "sft")
    settings = orbit.with_overrides(
        train_max_steps=2, train_eval_steps=1, train_batch_size=1, dpo_lr=1e-3
    )
    adapters = settings.workspace / "adapters"
    with pytest.raises(Interrupt):
        train_dpo(settings, sft="sft", pairs=pairs[:3], name="sft-dpo", callbacks=[StopAtTwo()])
    assert (adapters / ".runs" / DPO_TRAINING).exists()
    result = train_dpo(settings, resume=True)
    assert result.name == "sft-dpo" and result.steps == 2
    assert result.resumed_from and result.resumed_from.endswith("checkpoint-1")
    assert not (adapters / ".runs" / DPO_TRAINING).exists()

    info = AdapterRegistry(adapters).get("sft-dpo")
    meta = info.metadata
    assert meta["method"] == "dpo" and meta["parent"] == "sft"
    assert meta["base_model"] == AdapterRegistry(adapters).get("sft").base_model
    assert meta["dataset"] == "orbit" and len(meta["dataset_hash"]) == 64
    kinds = [p["origin"] for p in pairs[:3]]
    assert meta["pairs"]["count"] == 3
    assert meta["pairs"]["by_origin"] == {k: kinds.count(k) for k in set(kinds)}
    assert (
        meta["pairs"]["sha256"] == hashlib.sha256((info.path / PAIRS_FILE).read_bytes()).hexdigest()
    )
    assert meta["hyperparameters"]["dpo_lr"] == 1e-3 and meta["eval"] is None
    assert (info.path / "report.md").exists() and (info.path / "rewards.png").exists()

    # The reference was the SFT adapter: at step 1 the policy (the SFT weights) and the
    # reference give every answer the same log-probability, so both rewards are 0. At step 2
    # (after the resume) the policy has moved: the resumed run started from checkpoint-1's
    # adapter, not from the SFT weights again.
    steps = {h["step"]: h for h in meta["loss_curve"]}
    assert abs(steps[1]["rewards/margins"]) < 1e-6 and abs(steps[1]["rewards/chosen"]) < 1e-6
    assert abs(steps[1]["loss"] - 0.6931) < 1e-3  # -log sigmoid(0)
    assert abs(steps[2]["rewards/chosen"]) > 1e-6

    # One adapter of the SFT adapter's shape, changed by DPO, with no "ref" copy saved.
    assert (info.path / "adapter_config.json").exists() and not (info.path / "ref").exists()
    sft_weights = load_file(str(adapters / "sft" / "adapter_model.safetensors"))
    dpo_weights = load_file(str(info.path / "adapter_model.safetensors"))
    assert sft_weights.keys() == dpo_weights.keys()
    assert all(sft_weights[k].shape == dpo_weights[k].shape for k in sft_weights)
    assert any(not (sft_weights[k] == dpo_weights[k]).all() for k in sft_weights)
    assert not any(".ref." in k for k in dpo_weights)


def test_bad_input_says_what_to_do(orbit, tmp_path):
    pair = {
        "id": "p",
        "prompt": [{"role": "user", "content": "q"}],
        "chosen": "a",
        "rejected": "b",
        "origin": "auto:wrong",
        "question": "q",
    }
    with pytest.raises(ConfigError, match="no preference pairs"):
        train_dpo(orbit, sft="sft", pairs=[])
    with pytest.raises(ConfigError, match="no adapter named 'nope'"):
        train_dpo(orbit, sft="nope", pairs=[pair])
    alien = orbit.workspace / "adapters" / "alien"
    alien.mkdir()
    (alien / METADATA).write_text(json.dumps({"name": "alien", "base_model": "other/model"}))
    with pytest.raises(ConfigError, match="trained on 'other/model'"):
        train_dpo(orbit, sft="alien", pairs=[pair])
    with pytest.raises(ConfigError, match="lacks chosen"):
        train_dpo(orbit, sft="sft", pairs=[{k: v for k, v in pair.items() if k != "chosen"}])
    with pytest.raises(ConfigError, match="nothing to resume"):
        train_dpo(orbit, resume=True)
    with pytest.raises(ConfigError, match="no preference pairs file"):
        train_dpo(orbit, sft="sft", pairs=tmp_path / "missing.jsonl")
    # TRL drops a pair whose prompt alone fills max_length: none left is an error, not a no-op.
    long = {**pair, "prompt": build_messages("q", [Doc(" ".join(ORBIT_FACTS.values()), "all")])}
    with pytest.raises(ConfigError, match="raise DOCENT_TRAIN_MAX_LENGTH"):
        train_dpo(orbit.with_overrides(train_max_length=128), sft="sft", pairs=[long])
    assert not (orbit.workspace / "adapters" / ".runs" / DPO_TRAINING).exists()
