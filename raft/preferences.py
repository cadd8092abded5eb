"""Preference pairs for DPO: one prompt, an answer to prefer and one to avoid.

Two sources. **Feedback** from the serving store: a thumbs-down with a correction prefers a
grounded answer with the correction over what the model said; a thumbs-up prefers the
upvoted answer over a wrong one the tuned model gives to the same prompt. **Automatic**
pairs: the tuned model answers its own training questions, and every output judged wrong,
ungrounded (a quote the documents do not hold) or, when ``dpo_auto_kinds`` asks for it, not
declining where it should is paired against the verified target. The prompt of a pair is the
message list the model answered from, so ``raft.dpo`` renders it exactly as SFT and serving do.

A pair::

    {"id", "prompt": [messages, no answer], "chosen": str, "rejected": str,
     "origin": "feedback:correction" | "feedback:upvote" | "auto:wrong" | "auto:ungrounded"
               | "auto:refusal",
     "question": str}
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from docent.engine import ChatRequest, Engine
from docent.errors import ConfigError
from docent.prompts import (
    build_messages,
    format_answer,
    is_decline,
    normalise,
    parse_answer,
    squash,
)
from docent.settings import DocentSettings
from eval.metrics import gold_contained, quote_found, token_f1
from raft import show
from raft.answers import make_answer
from raft.text import sentence_with
from serving.attribution import final_answer
from serving.store import ServingStore

ORIGINS = (
    "feedback:correction",
    "feedback:upvote",
    "auto:wrong",
    "auto:ungrounded",
    "auto:refusal",
)
PAIR_KEYS = ("id", "prompt", "chosen", "rejected", "origin", "question")
# Below this token F1 (and without the gold inside it) a final answer counts as wrong. Only
# clearly wrong answers become "rejected": a right answer phrased differently must not be
# pushed down.
RIGHT_F1 = 0.5
# Samples at temperature 1.0 tried for a wrong answer when the greedy one is right.
WRONG_SAMPLES = 2
_DOCUMENT_RE = re.compile(r"<DOCUMENT [^>]*>\n(.*?)\n</DOCUMENT>", re.DOTALL)

# (prompt messages, gold answer) -> a verified wrong answer to that prompt, or None.
WrongAnswer = Callable[[list[dict[str, str]], str], str | None]


# Judging ------------------------------------------------------------------------------------
def context_texts(prompt: Sequence[dict[str, str]]) -> list[str]:
    """The document texts of a prompt, as the model saw them (what its quotes must copy)."""
    user = next((m["content"] for m in reversed(prompt) if m["role"] == "user"), "")
    return _DOCUMENT_RE.findall(user)


def is_wrong(output: str, gold: str) -> bool:
    """Whether ``output`` commits to a wrong answer. For a decline as gold, anything but a
    decline is wrong; otherwise a decline or an answer that neither holds the gold nor
    overlaps it much is (scored like ``docent eval``: the ``<ANSWER>:`` line only)."""
    answer = final_answer(output)
    declined = parse_answer(output).declined or not answer
    if is_decline(gold):
        return not declined
    if declined:
        return True
    golds = [gold]
    return not gold_contained(answer, golds) and token_f1(answer, golds) < RIGHT_F1


def judge(
    output: str, target: str, golds: Sequence[str], kind: str, context: Sequence[str]
) -> str | None:
    """The origin of the pair ``output`` makes against the verified ``target``, or None when
    it is right and grounded. ``context``: the documents' texts."""
    parsed = parse_answer(output)
    if kind == "refusal":
        return None if parsed.declined else "auto:refusal"
    answer = final_answer(output)
    right = any(not is_wrong(output, g) for g in golds) and bool(answer)
    if not right:
        return "auto:wrong"
    wanted = parse_answer(target).quotes
    # The target's quotes are held to the context only when they are in it: a RAFT example
    # without its oracle document ("no_oracle") quotes a sentence the context lacks.
    if (
        wanted
        and all(quote_found(q, context) for q in wanted)
        and (not parsed.quotes or not all(quote_found(q, context) for q in parsed.quotes))
    ):
        return "auto:ungrounded"
    return None


# Automatic pairs ----------------------------------------------------------------------------
def auto_pairs(
    settings: DocentSettings,
    raft_folder: Path,
    engine: Engine,
    adapter: str | None,
    *,
    max_tokens: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[list[dict[str, Any]], Counter[str]]:
    """Pairs from the tuned model's greedy answers to the training questions of a RAFT set:
    each wrong, ungrounded or non-declining answer against the example's verified target.
    Outputs are unguarded (no quote guard): DPO corrects the model's own distribution.
    Returns the pairs (file order, at most ``dpo_max_pairs``) and why examples gave none."""
    records = [r for r in show.load_examples(raft_folder, "train") if _has_target(r)]
    skipped: Counter[str] = Counter()
    requests = [
        ChatRequest(
            messages=r["messages"][:-1],
            max_tokens=max_tokens or settings.answer_max_tokens,
            adapter=adapter,
        )
        for r in records
    ]
    outputs = engine.generate(requests, progress) if requests else []
    pairs: list[dict[str, Any]] = []
    for record, completion in zip(records, outputs, strict=True):
        meta = record.get("meta", {})
        target = record["messages"][-1]["content"]
        prompt = record["messages"][:-1]
        golds = [str(meta.get("answer", "")), *meta.get("aliases", [])]
        origin = judge(
            completion.text, target, golds, str(meta.get("kind", "oracle")), context_texts(prompt)
        )
        if origin is None:
            skipped["correct"] += 1
        elif (kind := origin.removeprefix("auto:")) not in settings.dpo_auto_kinds:
            skipped[f"{kind}_not_used"] += 1
        elif squash(completion.text) == squash(target):
            skipped["output_is_target"] += 1
        elif len(pairs) >= settings.dpo_max_pairs:
            skipped["over_max_pairs"] += 1
        else:
            pairs.append(
                _pair(
                    f"auto-{record['id']}",
                    prompt,
                    target,
                    completion.text,
                    origin,
                    str(meta.get("question", "")),
                )
            )
    return pairs, skipped


def _has_target(record: dict[str, Any]) -> bool:
    messages = record.get("messages") or []
    return bool(messages) and messages[-1]["role"] == "assistant"


def model_wrong_answer(
    engine: Engine, adapter: str | None, max_tokens: int = 384, seed: int = 0
) -> WrongAnswer:
    """A ``WrongAnswer`` from the tuned model itself: its greedy answer when that is wrong,
    else the first wrong one of a few samples at temperature 1.0 (on-policy negatives)."""

    def wrong(prompt: list[dict[str, str]], gold: str) -> str | None:
        tries = [ChatRequest(prompt, max_tokens=max_tokens, adapter=adapter)]
        tries += [
            ChatRequest(
                prompt, max_tokens=max_tokens, adapter=adapter, temperature=1.0, seed=seed + i
            )
            for i in range(WRONG_SAMPLES)
        ]
        for request in tries:
            text = engine.generate([request])[0].text
            if text.strip() and is_wrong(text, gold):
                return text
        return None

    return wrong


# Feedback pairs -----------------------------------------------------------------------------
@dataclass
class _Chunk:
    """A stored chunk as a prompt document (``docent.prompts.ContextDoc``)."""

    text: str
    source: str


def feedback_pairs(
    store_or_folder: ServingStore | Path,
    raft_folder: Path | None,
    *,
    wrong_answer: WrongAnswer | None = None,
    cot_format: str | None = None,
) -> tuple[list[dict[str, Any]], Counter[str]]:
    """Pairs from rated answers in an open serving store (the caller closes it), or in the
    SQLite one in that folder (``<workspace>/serving``; none when it does not exist).
    ``cot_format``: the target style for corrections (default: the RAFT set's, else
    "reasoning"). Returns the pairs in feedback order and why rows gave none. Only the latest
    rating of an answer counts."""
    if isinstance(store_or_folder, Path):
        if not (store_or_folder / "serving.db").exists():
            return [], Counter()
        store = ServingStore(store_or_folder)
        try:
            return feedback_pairs(
                store, raft_folder, wrong_answer=wrong_answer, cot_format=cot_format
            )
        finally:
            store.close()
    targets, fmt = _raft_targets(raft_folder, cot_format)
    latest = {fb["answer_id"]: fb for fb in store_or_folder.feedback()}
    skipped: Counter[str] = Counter()
    pairs = []
    for fb in latest.values():
        pair, reason = _feedback_pair(store_or_folder, fb, targets, fmt, wrong_answer)
        if pair is None:
            skipped[reason] += 1
        else:
            pairs.append(pair)
    return pairs, skipped


def _raft_targets(raft_folder: Path | None, cot_format: str | None) -> tuple[dict[str, str], str]:
    """Verified targets of a RAFT set's answerable training questions by normalised question,
    and the answer format its targets use. The own-words rewrite needs the model, so those
    sets get the "quote" form it starts from."""
    if raft_folder is None:
        return {}, cot_format or "reasoning"
    fmt = cot_format or str(
        show.load_manifest(raft_folder).get("params", {}).get("raft_cot_format", "reasoning")
    )
    targets = {
        normalise(r["meta"]["question"]): r["messages"][-1]["content"]
        for r in show.load_examples(raft_folder, "train")
        if _has_target(r) and r.get("meta", {}).get("kind") == "oracle"
    }
    return targets, "quote" if fmt == "own_words" else fmt


def _feedback_pair(
    store: ServingStore,
    fb: dict[str, Any],
    targets: dict[str, str],
    fmt: str,
    wrong_answer: WrongAnswer | None,
) -> tuple[dict[str, Any] | None, str]:
    from serving.rag import NOTHING_RELEVANT, UNSUPPORTED

    rating = int(fb["rating"] or 0)
    if rating == 0:
        return None, "neutral_rating"
    stored = store.get_answer(fb["answer_id"])
    reasoning = stored.reasoning
    if stored.kind != "ask":
        # Chat and OpenAI answers were prompted with history, a mode or an integration's
        # instructions that the store does not keep: their prompt cannot be rebuilt exactly.
        return None, "prompt_not_reproducible"
    if (reasoning or "").strip() in (UNSUPPORTED, NOTHING_RELEVANT):
        return None, "answer_not_written_by_model"  # Docent's canned decline
    chunks = [_Chunk(c.get("text", ""), str(c.get("source", ""))) for c in stored.chunks]
    prompt = build_messages(stored.question, chunks)
    # The model's output, as parse_answer split it: an output without an <ANSWER>: line was
    # kept whole as the answer.
    said = _raw_output(reasoning or "", stored.answer)
    pair_id = f"fb{fb['id']}"
    if rating > 0:
        if wrong_answer is None:
            return None, "no_wrong_answer_source"
        rejected = wrong_answer(prompt, stored.answer)
        if rejected is None:
            return None, "no_wrong_answer_found"
        return _pair(pair_id, prompt, said, rejected, "feedback:upvote", stored.question), ""
    correction = (fb.get("correction") or "").strip()
    if not correction:
        return None, "downvote_without_correction"
    chosen = _correction_target(stored.question, correction, chunks, targets, fmt)
    if chosen is None:
        return None, "correction_not_in_context"
    if squash(chosen) == squash(said):
        return None, "correction_equals_answer"
    return _pair(pair_id, prompt, chosen, said, "feedback:correction", stored.question), ""


def _raw_output(reasoning: str, answer: str) -> str:
    return format_answer(reasoning, answer) if reasoning.strip() else answer.strip()


def _correction_target(
    question: str, correction: str, chunks: Sequence[_Chunk], targets: dict[str, str], fmt: str
) -> str | None:
    """A grounded answer with ``correction``: the RAFT set's verified target for the same
    question when it agrees with the correction and quotes these chunks, else the chunk
    sentence holding the correction, quoted, in the set's answer format."""
    texts = [c.text for c in chunks]
    known = targets.get(normalise(question))
    if known is not None:
        parsed = parse_answer(known)
        agrees = not is_wrong(known, correction) or gold_contained(correction, [parsed.answer])
        if agrees and parsed.quotes and all(quote_found(q, texts) for q in parsed.quotes):
            return known
    for chunk in chunks:
        sentence = sentence_with(correction, chunk.text)
        if sentence:
            return make_answer(question, correction, squash(sentence), chunk.source, fmt).cot
    return None


def _pair(
    pair_id: str,
    prompt: list[dict[str, str]],
    chosen: str,
    rejected: str,
    origin: str,
    question: str,
) -> dict[str, Any]:
    return {
        "id": pair_id,
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "origin": origin,
        "question": question,
    }


# Files --------------------------------------------------------------------------------------
def write_pairs(pairs: Sequence[dict[str, Any]], path: Path) -> str:
    """Write pairs as JSONL (atomically) and return the sha256 of the file."""
    content = "".join(json.dumps(p, ensure_ascii=False, sort_keys=True) + "\n" for p in pairs)
    data = content.encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return hashlib.sha256(data).hexdigest()


def load_pairs(path: Path) -> list[dict[str, Any]]:
    """Pairs from a JSONL file, each checked for the fields training needs."""
    if not path.exists():
        raise ConfigError(f"no preference pairs file at {path}: build it with auto/feedback pairs")
    pairs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    for n, pair in enumerate(pairs, start=1):
        check_pair(pair, f"{path}:{n}")
    return pairs


def check_pair(pair: dict[str, Any], where: str) -> None:
    missing = [k for k in PAIR_KEYS if k not in pair]
    if missing:
        raise ConfigError(f"preference pair {where} lacks {', '.join(missing)}: rebuild the pairs")
    if pair["origin"] not in ORIGINS:
        raise ConfigError(
            f"preference pair {where} has origin {pair['origin']!r}: "
            f"use one of {', '.join(ORIGINS)}"
        )
    if not pair["prompt"] or pair["prompt"][-1]["role"] != "user":
        raise ConfigError(f"preference pair {where}: the prompt must end with the user message")
    if not str(pair["chosen"]).strip() or not str(pair["rejected"]).strip():
        raise ConfigError(f"preference pair {where} has an empty chosen or rejected answer")
