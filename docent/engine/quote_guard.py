"""Quotes that can only copy the documents: at decode time, the text a model writes between
``##begin_quote##`` and ``##end_quote##`` is held to spans of the chunks it was given.

Why: a 135M model trained on RAFT targets learns the quote markers and, often, what a quote
looks like, but not to copy it: it repeats its own sentence, or the question, inside the
markers (stop 20: 37% of RAFT+RAG quotes were found in the context). A quote is only worth
showing when it is the documents' text, so the decoder is not allowed to write anything else
there (issue 14, item 7).

How: at each step of a request whose ``quote_sources`` are set, the output so far is decoded;
inside an open quote, of the ``TOP_N`` likeliest next tokens only those that keep the quote a
substring of a source (whitespace-insensitively, as ``eval.metrics.quote_found`` checks)
keep their logits, plus the closing marker once the quote holds a word. Outside quotes the
logits are untouched. Greedy decoding therefore picks the likeliest token that keeps the
quote true. One function serves transformers (a ``LogitsProcessor`` over the batch) and
vLLM (a per-request processor inside the engine core); neither library has a "substring of
these texts" constraint (vLLM's structured outputs take a grammar, and a grammar of every
substring of the context is as large as the context squared). Written by hand for that
reason.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from typing import Any

from docent.prompts import BEGIN_QUOTE, END_QUOTE, squash

EXTRA_ARGS_KEY = "docent_quote_sources"  # vLLM SamplingParams.extra_args key
VLLM_PROCESSOR = "docent.engine.quote_guard:QuoteLogitsProcessor"
TOP_N = 64  # candidates checked per step; when none fits, the sources say what may follow
MAX_PLACES = 64  # places in the sources a quote's continuation is looked up at
CLOSE = END_QUOTE[:2]  # "##": the closing marker has begun
_WHITESPACE = re.compile(r"\s+")
_SENTENCE_START = re.compile(r"(?<=[.!?:]) |\x00")


def _marks_end(text: str) -> bool:
    """``text`` (from a closing marker's first ``##`` on) is the marker, or part of it."""
    return END_QUOTE.startswith(text) or text.startswith(END_QUOTE)


def _spaces(text: str) -> str:
    return _WHITESPACE.sub(" ", text)


class TokenTexts:
    """Every token id's text, decoded once per tokenizer (49k ids: well under a second)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        size = len(tokenizer)
        self.texts: list[str] = tokenizer.batch_decode([[i] for i in range(size)])
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        for i in special:
            if 0 <= i < size:
                self.texts[i] = ""  # never part of a quote
        close = tokenizer.encode(END_QUOTE, add_special_tokens=False)
        self.close_id: int = int(close[0])

    def end_id(self, marker: str) -> int:
        """The first token of what is left of the closing marker after ``marker``."""
        rest = END_QUOTE[len(marker) :] if END_QUOTE.startswith(marker) else END_QUOTE
        ids = self.tokenizer.encode(rest or END_QUOTE, add_special_tokens=False)
        return int(ids[0])

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))


@functools.lru_cache(maxsize=4)
def token_texts(tokenizer_path: str) -> TokenTexts:
    from transformers import AutoTokenizer

    return TokenTexts(AutoTokenizer.from_pretrained(tokenizer_path))


def open_quote(text: str) -> tuple[str, str | None] | None:
    """Where ``text`` ends: None outside a quote; else the quote's text so far and, once its
    closing marker has begun, the part of the marker written (``("72 hours", "##en")``)."""
    start = text.rfind(BEGIN_QUOTE)
    if start < 0:
        return None
    tail = text[start + len(BEGIN_QUOTE) :]
    cut = tail.find(CLOSE)
    if cut < 0:
        return tail, None
    marker = tail[cut:]
    if marker.startswith(END_QUOTE):
        return None
    return tail[:cut], marker


class QuoteGuard:
    """A per-request logits processor: ``guard(output_ids, logits) -> logits``, the
    signature vLLM calls per request. ``sources`` are the texts a quote may copy."""

    def __init__(self, vocab: TokenTexts, sources: Sequence[str]) -> None:
        self.vocab = vocab
        # One string to search: NUL never occurs in a quote, so no match spans two sources.
        self.haystack = "\x00".join(squash(s) for s in sources if s.strip())
        self.steps_guarded = 0

    def allows(self, quote: str, token_text: str) -> bool:
        """Whether ``token_text`` may follow the open ``quote``."""
        if not token_text:
            return False
        joined = quote + token_text
        cut = joined.find(CLOSE, max(len(quote) - 1, 0))
        if cut >= 0:  # the token (with the quote's last character) starts the closing marker
            body = squash(joined[:cut])
            return (
                len(body) >= 3
                and body in self.haystack
                and any(c.isalnum() for c in body)
                and _marks_end(joined[cut:])
            )
        if not token_text.strip() and (not quote.strip() or quote[-1].isspace()):
            return False  # whitespace after whitespace could run on for ever
        # Spaces collapsed but a trailing one kept: "7 " must be followed by a space in the
        # source, so "72 hours" does not let a quote of "7" go on with " days".
        body = _spaces(joined).lstrip()
        return bool(body.strip()) and body in self.haystack

    def continuations(self, quote: str) -> list[int]:
        """The first token of the sources' text after each place ``quote`` occurs (at most
        ``MAX_PLACES``); for an empty quote, of each source's sentences."""
        body = _spaces(quote).lstrip()
        starts: list[int] = []
        if body.strip():
            at = self.haystack.find(body)
            while at >= 0 and len(starts) < MAX_PLACES:
                starts.append(at + len(body))
                at = self.haystack.find(body, at + 1)
        else:
            starts = [0, *(m.end() for m in _SENTENCE_START.finditer(self.haystack))]
        encode = self.vocab.tokenizer.encode
        ids: list[int] = []
        for start in starts[:MAX_PLACES]:
            ahead = self.haystack[start : start + 24].split("\x00")[0]
            if ahead:
                ids.append(int(encode(ahead, add_special_tokens=False)[0]))
        return list(dict.fromkeys(ids))

    def __call__(self, output_ids: Sequence[int], logits: Any) -> Any:
        if not self.haystack:
            return logits
        state = open_quote(self.vocab.decode(output_ids))
        if state is None:
            return logits
        import torch

        quote, marker = state
        self.steps_guarded += 1
        texts = self.vocab.texts
        usable = min(logits.shape[-1], len(texts))
        if marker is None:

            def fits(i: int) -> bool:
                return self.allows(quote, texts[i])

            fallback = self.vocab.close_id  # nothing in reach continues the quote: close it
            if not squash(quote):
                fallback = -1  # an empty quote stays unguarded rather than loop on a dead end
        else:

            def fits(i: int) -> bool:
                return bool(texts[i]) and _marks_end(marker + texts[i])

            fallback = self.vocab.end_id(marker)
        top = torch.topk(logits[:usable], min(TOP_N, usable)).indices.tolist()
        allowed = [i for i in top if fits(i)]
        if not allowed and marker is None:
            # None of the likeliest tokens fits (the model means another text): the next
            # tokens the sources themselves allow, found from where the quote occurs in them.
            allowed = [i for i in self.continuations(quote) if fits(i)]
        if not allowed:
            if fallback < 0:
                return logits
            allowed = [fallback]
        kept = torch.full_like(logits, float("-inf"))
        kept[allowed] = logits[allowed]
        return kept


class HFQuoteProcessor:
    """The guard for transformers' ``generate``: one instance per batch, one guard per row
    (None where the request set no sources). ``prompt_len`` is the padded prompt width."""

    def __init__(self, guards: Sequence[QuoteGuard | None], prompt_len: int) -> None:
        self.guards = list(guards)
        self.prompt_len = prompt_len

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        for row, guard in enumerate(self.guards):
            if guard is not None:
                scores[row] = guard(input_ids[row, self.prompt_len :].tolist(), scores[row])
        return scores


def _vllm_processor_class() -> type[Any]:
    from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

    class QuoteLogitsProcessor(AdapterLogitsProcessor):  # type: ignore[misc]
        """vLLM's side: requests carry their sources in ``extra_args``; the tokenizer is
        loaded from the model's own path inside the engine process."""

        def __init__(self, vllm_config: Any, device: Any, is_pin_memory: bool) -> None:
            super().__init__(vllm_config, device, is_pin_memory)
            self.tokenizer_path = str(vllm_config.model_config.tokenizer)

        def is_argmax_invariant(self) -> bool:
            return False

        def new_req_logits_processor(self, params: Any) -> QuoteGuard | None:
            sources = (params.extra_args or {}).get(EXTRA_ARGS_KEY)
            if not sources:
                return None
            return QuoteGuard(token_texts(self.tokenizer_path), sources)

    return QuoteLogitsProcessor


def __getattr__(name: str) -> Any:
    # vLLM loads the processor by name (VLLM_PROCESSOR) in its engine process; building the
    # class on first access keeps vLLM out of this module's imports.
    if name == "QuoteLogitsProcessor":
        cls = _vllm_processor_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)
