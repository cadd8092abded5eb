"""Self-rehearsal: general requests the base model writes and answers itself, mixed into
training so the adapter keeps what the model did away from the documents.

Why: LoRA on RAFT examples moves the 135M model on prompts with no documents too. After run 6
(README) the forgetting probe fell from 83.3% to 63.3%, and the misses were the RAFT target's
shape applied where it does not belong ("Frozen water is frozen water.", "The opposite of hot
is cool."). Replaying the base model's own answers to general requests anchors those prompts to
their old outputs: rehearsal with self-synthesised data (Huang et al. 2024, "Mitigating
Catastrophic Forgetting in Large Language Models with Self-Synthesized Rehearsal"). The requests
need no dataset and no download: as in Magpie (Xu et al. 2024), the model is given its chat
template up to the start of a user turn and writes the user's message itself (sampled); it then
answers it greedily, exactly as serving would answer a user. Its answers are its own, so they
cost the adapter nothing to fit and pull it back wherever it drifted.

Requests close to a forgetting-probe question are dropped (the probe must stay a held-out
measure, as the test split is), and so are unfinished ones. Pairs are kept in
``<workspace>/raft/cache/rehearsal.jsonl`` per generator and seed, so a second run reuses them.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from docent.progress import Progress, no_progress
from docent.prompts import chat_prompt
from raft.text import content_words

VERSION = 1
REQUEST_TOKENS = 64
ANSWER_TOKENS = 128
BATCH = 24
MIN_WORDS, MAX_WORDS = 4, 60
# A request this close to a probe question (content-word Jaccard) is the probe's own, not a
# rehearsal of general behaviour.
PROBE_OVERLAP = 0.5
_MARKER = "\u2063rehearsal-request\u2063"
_SENTENCE_END = re.compile(r"[.!?](?=\s)|\n\n")
_SPECIAL = re.compile(r"<\|[^|]*\|>|</?s>")
PROBES = Path(__file__).resolve().parent.parent / "eval" / "probes" / "general.jsonl"


@dataclass
class Rehearsal:
    """Accepted (request, answer) pairs and the candidates dropped, by reason."""

    pairs: list[tuple[str, str]] = field(default_factory=list)
    rejected: Counter[str] = field(default_factory=Counter)


def rehearsal_count(examples: int, fraction: float) -> int:
    """Rehearsal rows that make ``fraction`` of a training mix with ``examples`` RAFT rows."""
    if fraction <= 0 or examples <= 0:
        return 0
    return max(1, round(examples * fraction / (1.0 - fraction)))


def request_prefix(tokenizer: Any) -> str:
    """The chat template up to where a user's message starts (Magpie's prompt). Rendered from
    the template itself, so it holds for any chat model, with its default system turn."""
    text = chat_prompt(tokenizer, [{"role": "user", "content": _MARKER}])
    return text[: text.index(_MARKER)]


def _probe_words() -> list[set[str]]:
    rows = [json.loads(line) for line in PROBES.read_text().splitlines() if line.strip()]
    return [content_words(r["question"]) for r in rows]


def check_request(text: str, probes: Sequence[set[str]]) -> str:
    """Why a sampled request cannot be rehearsed, or "" when it can."""
    if _SPECIAL.search(text):
        return "markup"
    words = len(text.split())
    if words < MIN_WORDS:
        return "too_short"
    if words > MAX_WORDS:
        return "too_long"
    if "?" not in text:
        # Users ask Docent questions; statements and role-play openings ("Hello, I'm John, a
        # marketing specialist") draw answers that are neither.
        return "not_a_question"
    own = content_words(text)
    for probe in probes:
        if own and probe and len(own & probe) / len(own | probe) >= PROBE_OVERLAP:
            return "probe_question"
    return ""


def whole_sentences(text: str) -> str:
    """An answer cut by the token budget, up to its last finished sentence, when that keeps
    at least half of it: the model's own words, ending where it could have stopped (a long
    answer would cost the budget's tokens on every try, and most of the model's run long)."""
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    if not ends or ends[-1] < len(text) / 2:
        return ""
    return text[: ends[-1]].strip()


def _generate(model: Any, tokenizer: Any, prompts: list[str], max_new: int, sample: bool,
              seed: int) -> list[tuple[str, bool]]:
    """Each prompt's continuation and whether it ended by itself (EOS) within ``max_new``."""
    import torch

    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    enc = enc.to(model.device)
    torch.manual_seed(seed)
    eos = tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(
            **enc, max_new_tokens=max_new, do_sample=sample, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=eos, **({"temperature": 1.0, "top_p": 0.95} if sample else {}),
        )
    results = []
    for row in out[:, enc["input_ids"].shape[1]:].tolist():
        ended = eos in row
        ids = row[: row.index(eos)] if ended else row
        results.append((tokenizer.decode(ids, skip_special_tokens=True).strip(), ended))
    return results


def synthesise(model: Any, tokenizer: Any, n: int, seed: int,
               progress: Progress = no_progress) -> Rehearsal:
    """``n`` rehearsal pairs from ``model`` itself: sampled requests, greedy answers."""
    prefix = request_prefix(tokenizer)
    probes = _probe_words()
    got = Rehearsal()
    seen: set[str] = set()
    rng = random.Random(seed)
    rounds = 0
    # Most requests pass; a few rounds more than needed bound the cost when many do not.
    while len(got.pairs) < n and rounds < 4 + n // BATCH * 2:
        rounds += 1
        requests = []
        # About half the sampled requests end up as pairs: ask for twice what is missing.
        size = min(BATCH, max(4, 2 * (n - len(got.pairs))))
        for text, ended in _generate(model, tokenizer, [prefix] * size, REQUEST_TOKENS,
                                     True, rng.randrange(2**31)):
            reason = "unfinished" if not ended else check_request(text, probes)
            key = " ".join(text.lower().split())
            if not reason and key in seen:
                reason = "duplicate"
            if reason:
                got.rejected[f"request_{reason}"] += 1
                continue
            seen.add(key)
            requests.append(text)
        if not requests:
            continue
        prompts = [chat_prompt(tokenizer, [{"role": "user", "content": r}]) for r in requests]
        for request, (answer, ended) in zip(
            requests, _generate(model, tokenizer, prompts, ANSWER_TOKENS, False, seed), strict=True
        ):
            if not ended:
                answer = whole_sentences(answer)
                got.rejected["answer_cut_at_a_sentence" if answer else "answer_unfinished"] += 1
            if not answer:
                got.rejected["answer_empty"] += 1
            elif len(got.pairs) < n:
                got.pairs.append((request, answer))
        progress("rehearsal", min(len(got.pairs), n), n)
    return got


def rehearsal_rows(model: Any, tokenizer: Any, n: int, *, seed: int, generator: str,
                   cache_dir: Path, progress: Progress = no_progress
                   ) -> tuple[list[dict[str, str]], Counter[str]]:
    """``n`` prompt/completion rows in the form training takes (the prompt rendered by
    :func:`chat_prompt`, as serving renders a user's message), from the cache where it has
    them, and the candidates made here and dropped, by reason. Fewer than ``n`` rows come back
    when the model writes too few usable requests; training goes on with what there is."""
    rejected: Counter[str] = Counter()
    if n <= 0:
        return [], rejected
    path = cache_dir / "rehearsal.jsonl"
    key = {"generator": generator, "seed": seed, "version": VERSION}
    cached: list[tuple[str, str]] = []
    if path.exists():
        for line in path.read_text().splitlines():
            row = json.loads(line) if line.strip() else None
            if row and row.get("key") == key:
                cached.append((row["request"], row["answer"]))
    if len(cached) < n:
        made = synthesise(model, tokenizer, n - len(cached), seed + len(cached), progress)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            for request, answer in made.pairs:
                f.write(json.dumps({"key": key, "request": request, "answer": answer}) + "\n")
        cached.extend(made.pairs)
        rejected = made.rejected
    rows = [
        {"prompt": chat_prompt(tokenizer, [{"role": "user", "content": request}]),
         "completion": answer}
        for request, answer in cached[:n]
    ]
    return rows, rejected
