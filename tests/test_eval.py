"""Eval: metric functions on hand-made cases, and a small end-to-end run that writes the
report (real index, real embedder, real SmolLM2 on the transformers engine)."""

from __future__ import annotations

import json

import pytest

from eval import metrics as m

from conftest import HANDBOOK


@pytest.mark.parametrize(
    ("pred", "golds", "em", "contained"),
    [
        ("72 hours", ["72 hours"], 1.0, 1.0),
        ("The link lasts 72 hours.", ["72 hours", "3 days"], 0.0, 1.0),
        ("three days", ["72 hours", "3 days", "three days"], 1.0, 1.0),
        ("720 hours", ["72 hours"], 0.0, 0.0),  # word bounds: 72 is not in 720
        ("7", ["72"], 0.0, 0.0),
        ("", ["72 hours"], 0.0, 0.0),  # an empty answer is never right
        ("anything", [""], 0.0, 0.0),  # nor is an empty gold
        ("The Café", ["cafe"], 1.0, 1.0),  # accents, articles and case folded
        ("ＱＦ-４１２７", ["QF-4127"], 1.0, 1.0),  # full-width forms (NFKD)
        ("“Commonplace”", ["Commonplace"], 1.0, 1.0),
        ("Water freezes at 0°C.", ["0"], 0.0, 1.0),  # symbols separate words
        ("It costs €29 a seat", ["29"], 0.0, 1.0),
        ("20°C", ["0"], 0.0, 0.0),
    ],
)
def test_answer_matching(pred, golds, em, contained):
    assert m.exact_match(pred, golds) == em
    assert m.gold_contained(pred, golds) == contained


@pytest.mark.parametrize(
    ("output", "final"),
    [
        ("Links last 3 days. Or maybe 72 hours.", "Links last 3 days."),
        ("So ##begin_quote##valid for 72 hours##end_quote##\n<ANSWER>: 72 hours", "72 hours"),
        ("first line\nsecond line with 72 hours", "first line"),
        ("<ANSWER>:", ""),
        ("   ", ""),
    ],
)
def test_final_answer_is_the_answer_line_or_the_first_sentence(output, final):
    assert m.final_answer(output) == final


def test_the_headline_counts_a_gold_only_in_the_final_answer():
    golds = ["72 hours", "3 days"]
    rambling = "Invitations expire after a week. Some say 72 hours, others 3 days."
    assert m.final_answer_scores(rambling, golds) == (0.0, 0.0, 0.0)
    assert m.gold_contained(rambling, golds) == 1.0  # the lenient, whole-output figure
    committed = "The guide says they expire.\n<ANSWER>: 72 hours"
    assert m.final_answer_scores(committed, golds) == (1.0, 1.0, 1.0)
    wordy = "Links are valid for 72 hours. Then they expire."
    em, f1, contained = m.final_answer_scores(wordy, golds)
    assert (em, contained) == (0.0, 1.0) and 0.0 < f1 < 1.0


def test_token_f1_takes_the_best_gold():
    assert m.token_f1("up to 25 people", ["25", "25 people"]) == pytest.approx(2 / 3)
    assert m.token_f1("", ["25"]) == 0.0
    assert m.token_f1("nothing shared", ["25"]) == 0.0


def test_retrieval_ranks():
    ranked = ["b.md", "a.md", "a.md", "c.md"]
    assert m.first_relevant_rank(ranked, "a.md") == 2
    assert m.recall_at(ranked, "a.md", 1) == 0.0 and m.recall_at(ranked, "a.md", 2) == 1.0
    assert m.reciprocal_rank(ranked, "a.md") == 0.5
    assert m.reciprocal_rank(ranked, "z.md") == 0.0
    assert m.ndcg_at(["a.md", "a.md", "b.md"], "a.md") == pytest.approx(1.0)
    assert 0 < m.ndcg_at(ranked, "a.md") < 1
    assert m.ndcg_at(ranked, "z.md") == 0.0


def test_quotes_are_grounded_only_when_verbatim():
    chunks = ["Links are valid for 72 hours,\nafter which they expire."]
    assert m.quote_found("valid for 72 hours, after which", chunks)
    assert not m.quote_found("valid for 3 days", chunks)
    assert not m.quote_found("  ", chunks)


def test_questions_file_errors_are_clear(tmp_path):
    from docent.errors import ConfigError
    from eval.runner import load_questions

    bad = tmp_path / "qa.jsonl"
    bad.write_text('{"question": "no answer"}\n')
    with pytest.raises(ConfigError, match="qa.jsonl:1"):
        load_questions(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_questions(tmp_path / "missing.jsonl")
    rows = load_questions(HANDBOOK / "qa.jsonl")
    assert sum(q.answerable for q in rows) == 40 and sum(not q.answerable for q in rows) == 10
    few = load_questions(HANDBOOK / "qa.jsonl", limit=8)
    assert sum(q.answerable for q in few) == 8 and sum(not q.answerable for q in few) == 2
    assert [q.id for q in few if q.answerable] == [q.id for q in rows if q.answerable][:8]
    with pytest.raises(ConfigError, match="--limit"):
        load_questions(HANDBOOK / "qa.jsonl", limit=0)


@pytest.mark.slow
def test_small_eval_run_writes_the_report(tmp_path, handbook_settings, embedder, hf_serving_engine):
    from eval.report import write_report
    from eval.runner import run_eval

    qa = tmp_path / "qa.jsonl"
    rows = [json.loads(line) for line in (HANDBOOK / "qa.jsonl").read_text().splitlines()]
    picked = [r for r in rows if r["split"] == "test"][:4] + [
        r for r in rows if not r["answerable"]
    ][:2]
    qa.write_text("".join(json.dumps(r) + "\n" for r in picked))
    result = run_eval(
        handbook_settings,
        qa,
        systems=["base", "base+rag"],
        sweep=True,
        max_tokens=24,
        engine=hf_serving_engine,
        embedder=embedder,
    )
    assert result.answerable == 4 and result.unanswerable == 2
    assert set(result.systems) == {"base", "base+rag"}
    assert result.retrieval["recall@5"] == 1.0  # handbook retrieval finds every gold source
    for scores in result.systems.values():
        assert 0.0 <= scores["accuracy"] <= scores["answer_rate"] <= 1.0
    assert set(result.sweep["base+rag"]) == {"0", "1", "2", "4", "8"}
    assert result.forgetting["probes"] == 100
    assert "raft" not in result.forgetting and "lost" not in result.forgetting  # no adapter
    assert len(result.predictions) == 12

    folder = write_report(result, tmp_path / "reports")
    data = json.loads((folder / "eval.json").read_text())
    assert set(data) >= {"systems", "retrieval", "sweep", "forgetting", "predictions", "settings"}
    md = (folder / "report.md").read_text()
    assert "| base+rag |" in md and "Distractor sweep" in md
    assert (folder / "systems.png").stat().st_size > 1000
    assert (folder / "sweep.png").exists()
    assert "<table>" in (folder / "report.html").read_text()


def test_raft_systems_without_an_adapter_say_what_to_do(handbook_settings):
    from docent.errors import ConfigError
    from eval.runner import run_eval

    with pytest.raises(ConfigError, match="docent train"):
        run_eval(handbook_settings, HANDBOOK / "qa.jsonl", systems=["raft+rag"])
    with pytest.raises(ConfigError, match="unknown system"):
        run_eval(handbook_settings, HANDBOOK / "qa.jsonl", systems=["gpt"])


@pytest.mark.slow
def test_a_killed_eval_resumes_where_it_stopped(tmp_path, handbook_settings):
    """SIGKILL `docent eval` once its first answers are kept: the re-run asks the model only
    for the rest, and --fresh asks again for everything."""
    import contextlib
    import shutil
    import signal
    import sqlite3
    import subprocess
    import sys
    import time

    workspace = tmp_path / "ws"
    shutil.copytree(handbook_settings.workspace / "index", workspace / "index")
    args = [sys.executable, "-m", "docent.cli", "--workspace", str(workspace), "eval",
            "--qa", str(HANDBOOK / "qa.jsonl"), "--systems", "base,base+rag", "--limit", "4",
            "--max-tokens", "16", "--no-forgetting", "--engine", "hf", "--json"]
    kept = workspace / "eval" / "answers.sqlite"

    def rows() -> int:
        if not kept.exists():
            return 0
        with contextlib.closing(sqlite3.connect(kept)) as db:
            try:
                return int(db.execute("SELECT COUNT(*) FROM answers").fetchone()[0])
            except sqlite3.OperationalError:  # the table is being created
                return 0

    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600
    while rows() == 0 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)
    first.wait()
    before = rows()
    assert before >= 1, "the first batch was never kept"
    assert before < 10, "the killed run finished before it was killed: nothing to resume"

    again = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    result = json.loads(again.stdout)
    assert result["settings"]["answers_reused"] == before
    assert result["settings"]["answers_reused"] + result["settings"]["answers_generated"] == 10
    assert result["answerable"] == 4 and set(result["systems"]) == {"base", "base+rag"}
    assert rows() == 10

    fresh = subprocess.run([*args, "--fresh"], capture_output=True, text=True, timeout=600)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    redone = json.loads(fresh.stdout)
    assert redone["settings"]["answers_reused"] == 0
    assert redone["systems"] == result["systems"]  # greedy: the same answers again


def test_a_dead_vllm_engine_is_one_line_with_cause_and_fix():
    pytest.importorskip("vllm")
    from vllm.v1.engine.exceptions import EngineDeadError

    from docent.engine.vllm_engine import engine_died, is_engine_death

    try:
        try:
            raise TimeoutError("RPC call to execute_model timed out.")
        except TimeoutError as inner:
            raise EngineDeadError("EngineCore encountered an issue.") from inner
    except EngineDeadError as exc:
        assert is_engine_death(exc)
        message = str(engine_died(exc))
    assert "\n" not in message
    assert "timed out" in message and "--engine hf" in message
    assert "DOCENT_VLLM_MAX_BATCHED_TOKENS" in message
    assert not is_engine_death(ValueError("prompt is longer than max_model_len"))


# Scoring as `docent eval` does it, on a scripted engine and hand-made hits -----------------
INVITE_TEXT = (
    "# Inviting your team\n\nInvitation links to a workspace are valid for 72 hours, after "
    "which the person must be invited again. You can invite up to 25 people at once."
)
SCRIPT = {
    # Quotes its evidence and commits to the answer.
    "How long is an invitation link valid?": (
        "##begin_quote##valid for 72 hours##end_quote##\n<ANSWER>: 72 hours"
    ),
    # No quote, no answer line: the first sentence is the answer, and a sentence states it.
    "How many people can I invite at once?": "You can invite 25 people. Or maybe 30.",
    # Rambles to the gold only in its second sentence, and states nothing retrieved.
    "Who approves a refund?": "The finance team decides. The support lead or the CEO may too.",
    "What colour is the office?": "<ANSWER>: I don't know: the documents do not say.",
}


class ScriptedEngine:
    """Answers each question with its scripted reply (found in the last user message)."""

    kind, model = "scripted", "scripted"

    def generate(self, requests, progress=None):
        from docent.engine import Completion

        out = []
        for r in requests:
            asked = r.messages[-1]["content"].rsplit("Question: ", 1)[-1]
            out.append(Completion(SCRIPT[asked], 10, 5, "stop", self.model))
        return out


def _eval_answers(tmp_path, decline: str = "support", system: str = "base+rag"):
    from docent.settings import DocentSettings
    from eval.answer_cache import AnswerCache
    from eval.runner import Question, _answer, _Answerer, _system_scores, _Variant
    from retrieval import Hit

    settings = DocentSettings(workspace=tmp_path / "ws", decline_ungrounded=decline)
    hits = [
        Hit("c1", 1, 0.9, INVITE_TEXT, "getting-started.md", None, "Inviting", None, "default"),
        Hit("c2", 2, 0.5, "Refunds take 5 days.", "billing.md", None, "Refunds", None, "default"),
    ]
    questions = [
        Question("q1", "How long is an invitation link valid?", ["72 hours"],
                 "getting-started.md", None, True),
        Question("q2", "How many people can I invite at once?", ["25"],
                 "getting-started.md", None, True),
        Question("q3", "Who approves a refund?", ["the CEO"], "billing.md", None, True),
        Question("q4", "What colour is the office?", [], None, None, False),
    ]
    cache = AnswerCache(tmp_path / "answers.sqlite", {"generator": "scripted"})
    ask = _Answerer(ScriptedEngine(), None, _Variant("base", [system]), cache, fresh=False)
    try:
        preds = _answer(ask, questions, system, True, {q.id: hits for q in questions}, 2,
                        settings, 32)
    finally:
        cache.close()
    return {p.qid: p for p in preds}, _system_scores(preds, questions)


def test_eval_scores_final_answers_and_ties_them_to_evidence_as_serving_does(tmp_path):
    preds, scores = _eval_answers(tmp_path)
    assert [preds[q].contained for q in ("q1", "q2", "q3")] == [1.0, 1.0, 0.0]
    assert preds["q3"].contained_whole == 1.0  # "the CEO" only in its second sentence
    assert preds["q2"].answer == "You can invite 25 people."
    assert scores["accuracy"] == pytest.approx(2 / 3)
    assert scores["accuracy_whole_output"] == pytest.approx(1.0)
    assert scores["precision"] == pytest.approx(2 / 3)
    # q1 quoted, q2 is attributed to the sentence that states it, q3 is supported by nothing.
    assert [preds[q].cited_source for q in ("q1", "q2", "q3")] == [
        "getting-started.md", "getting-started.md", None,
    ]
    assert [preds[q].ungrounded for q in ("q1", "q2", "q3", "q4")] == [False, False, True, False]
    assert scores["answers_with_citation"] == pytest.approx(2 / 3)
    assert scores["ungrounded_answers"] == pytest.approx(1 / 3)
    assert scores["cited_gold_source"] == 1.0
    assert scores["declined_unanswerable"] == 1.0


def test_eval_declines_ungrounded_answers_when_plain_questions_would(tmp_path):
    preds, scores = _eval_answers(tmp_path, decline="always")
    assert preds["q3"].declined and preds["q3"].ungrounded
    assert preds["q3"].answer.startswith("I don't know")
    assert preds["q3"].contained_whole == 0.0  # a declined answer scores nothing
    assert scores["answer_rate"] == pytest.approx(2 / 3)
    assert scores["ungrounded_answers"] == 0.0  # what users get: no ungrounded answer left
    assert scores["accuracy"] == pytest.approx(2 / 3) and scores["precision"] == 1.0


def test_eval_declines_as_the_default_rule_does_per_system(tmp_path):
    # "tuned": the adapter's ungrounded answer is declined, the base model's only flagged.
    raft, _ = _eval_answers(tmp_path / "raft", decline="tuned", system="raft+rag")
    base, _ = _eval_answers(tmp_path / "base", decline="tuned", system="base+rag")
    assert raft["q3"].declined and raft["q3"].ungrounded
    assert not base["q3"].declined and base["q3"].ungrounded
    assert not raft["q1"].declined and not raft["q2"].declined  # grounded answers stand


def test_the_report_names_the_headline_and_the_lenient_figure(tmp_path):
    from eval.report import COLUMNS, _html, headline, markdown
    from eval.runner import EvalResult

    keys = [key for key, _ in COLUMNS]
    assert keys[:4] == ["accuracy", "exact_match", "f1", "accuracy_whole_output"]
    assert {"answers_with_citation", "ungrounded_answers"} <= set(keys)
    base = dict.fromkeys(keys, 0.5) | {"accuracy": 0.4, "accuracy_whole_output": 0.7}
    raft = dict.fromkeys(keys, 0.5) | {"accuracy": 0.55, "accuracy_whole_output": 0.6}
    result = EvalResult(
        settings={"k": 3, "split": "test", "max_tokens": 32, "qa_file": "qa.jsonl"},
        adapter="a", questions=5, answerable=4, unanswerable=1, retrieval={},
        systems={"base+rag": base, "raft+rag": raft},
    )
    line = headline(result)[0]
    assert "55.0% vs 40.0% accuracy, gold in the final answer (+15.0 points)" in line
    assert "gold anywhere in the output: 60.0% vs 70.0%" in line
    md = markdown(result, [])
    assert "| system | accuracy (gold in final answer) | EM (final answer) |" in md
    assert "gold anywhere in output" in md and "answers no document supports" in md
    assert "<th>gold anywhere in output</th>" in _html(md, [])
