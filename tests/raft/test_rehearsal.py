"""Self-rehearsal (raft/rehearsal.py): the request prompt comes from the real chat template,
and requests and answers are checked. Training with it is tested in test_train.py."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from docent.models import generator_path
from docent.prompts import SYSTEM_PROMPT, chat_prompt
from raft.rehearsal import (
    PROBES,
    check_request,
    rehearsal_count,
    request_prefix,
    whole_sentences,
)
from raft.text import content_words


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(generator_path())


def test_the_request_prefix_is_the_template_up_to_the_users_words(tokenizer):
    prefix = request_prefix(tokenizer)
    assert prefix.endswith("<|im_start|>user\n")
    rendered = chat_prompt(tokenizer, [{"role": "user", "content": "Hi there?"}])
    assert rendered.startswith(prefix + "Hi there?")
    assert SYSTEM_PROMPT not in prefix  # a general chat, not a Docent question


def test_requests_are_checked_and_probe_questions_kept_out():
    probes = [content_words(json.loads(line)["question"])
              for line in PROBES.read_text().splitlines() if line.strip()]
    assert check_request("Can you suggest a good plan for a small garden?", probes) == ""
    assert check_request("Hi?", probes) == "too_short"
    assert check_request("I am planning a trip to Rome next week with my family.",
                         probes) == "not_a_question"
    assert check_request("Quick one: what is the capital of France?", probes) == "probe_question"
    assert check_request("<|im_start|>user what is this thing here?", probes) == "markup"


def test_a_cut_answer_keeps_its_finished_sentences_only():
    assert whole_sentences("First point. Second point. Third poi") == "First point. Second point."
    assert whole_sentences("Short. And then a very long unfinished clause that goes on") == ""
    assert rehearsal_count(148, 0.25) == 49 and rehearsal_count(148, 0.0) == 0
