"""Choosing adapters by their answers: validation questions, the promotion gate, the tune
grid, its budget and early stopping, and (slow) `tune` end to end on the real SmolLM2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from docent.cli import app
from docent.errors import ConfigError
from docent.models import generator_id
from docent.settings import DocentSettings
from eval.promotion import gate_decision
from eval.runner import load_questions
from eval.tune import expand_grid, fits_budget, grid_axes, stalled
from eval.validation import (
    MIN_ASKED,
    known_base_rag,
    prepare_validation,
    record_score,
    recorded_score,
    validation_questions,
)
from raft.adapters import METADATA, AdapterError, AdapterRegistry

from conftest import NO_MODEL_RECIPE, write_corpus, write_qa


# Validation questions from a hand-written RAFT folder ---------------------------------------
def _row(question: str, answer: str, kind: str, source: str = "a.md") -> dict:
    return {
        "id": f"{kind}-{question}",
        "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": "x"}],
        "meta": {"question": question, "answer": answer, "kind": kind, "source": source},
    }


def _raft_folder(workspace: Path, rows: list[dict], name: str = "handmade") -> Path:
    folder = workspace / "raft" / name
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"name": name, "dataset_hash": "f" * 64}))
    body = "".join(json.dumps(r) + "\n" for r in rows)
    (folder / "validation.jsonl").write_text(body, encoding="utf-8")
    return folder


ROWS = [
    _row("When does the desk open?", "08:30", "oracle"),
    _row("When does the desk open?", "08:30", "no_oracle"),  # the same question again
    _row("When  does the DESK open?", "08:30", "oracle"),  # ... spaced and cased differently
    _row("When does the desk open?", "I cannot answer", "refusal"),
    _row("Who signs refunds?", "I cannot answer", "refusal"),  # only ever a refusal
    *[_row(f"What is code {i}?", f"C-{i}", "oracle", f"s{i}.md") for i in range(10)],
]


def test_validation_questions_are_answerable_asked_once_and_picked_by_seed(tmp_path):
    folder = _raft_folder(tmp_path, ROWS)
    every = validation_questions(folder, cap=100, seed=0)
    questions = [r["question"] for r in every]
    assert len(questions) == 11 and len(set(questions)) == 11
    assert "Who signs refunds?" not in questions
    assert {r["answer"] for r in every if "desk" in r["question"]} == {"08:30"}
    assert all(r["split"] == "validation" and r["answerable"] for r in every)

    picked = validation_questions(folder, cap=4, seed=0)
    assert len(picked) == 4 and picked == validation_questions(folder, cap=4, seed=0)
    other = validation_questions(folder, cap=4, seed=1)
    assert {r["question"] for r in picked} != {r["question"] for r in other}
    with pytest.raises(ConfigError, match="at least 1"):
        validation_questions(folder, cap=0, seed=0)


def test_cloze_questions_are_asked_only_when_too_few_others_exist(tmp_path):
    # A cloze form is a training wording; the gate asks what a user would ask.
    def cloze(i: int) -> dict:
        row = _row(f"The desk opens at what {i}?", f"{i}", "oracle")
        row["meta"]["origin"] = "rules:cloze"
        return row

    folder = _raft_folder(tmp_path, [*ROWS, *[cloze(i) for i in range(5)]])
    assert not any("what" in r["question"] for r in validation_questions(folder, 100, seed=0))
    few = _raft_folder(tmp_path, [ROWS[0], *[cloze(i) for i in range(20)]], name="few")
    asked = validation_questions(few, cap=100, seed=0)
    assert len(asked) == MIN_ASKED and asked[0]["question"] == "When does the desk open?"


def test_prepared_questions_are_what_run_eval_reads(tmp_path):
    _raft_folder(tmp_path, ROWS)
    settings = DocentSettings(workspace=tmp_path, tune_val_questions=5)
    vset = prepare_validation(settings, "handmade")
    questions = load_questions(vset.qa_file, split="validation")
    assert vset.questions == len(questions) == 5
    assert all(q.answerable and q.golds and q.source for q in questions)
    assert vset.key["dataset_hash"] == "f" * 64 and vset.key["questions_cap"] == 5
    bigger = prepare_validation(settings.with_overrides(tune_val_questions=6), "handmade")
    assert bigger.digest != vset.digest and bigger.qa_file != vset.qa_file


def test_a_set_without_answerable_validation_questions_says_what_to_do(tmp_path):
    _raft_folder(tmp_path, [_row("Who signs refunds?", "I cannot answer", "refusal")])
    with pytest.raises(ConfigError, match="no answerable validation questions.*adapters promote"):
        prepare_validation(DocentSettings(workspace=tmp_path), "handmade")


def _fake_adapter(registry: AdapterRegistry, name: str) -> None:
    folder = registry.dir / name
    folder.mkdir(parents=True)
    (folder / METADATA).write_text(json.dumps({"name": name, "base_model": generator_id()}))


def test_scores_are_reused_only_on_the_same_validation_set(tmp_path):
    _raft_folder(tmp_path, ROWS)
    settings = DocentSettings(workspace=tmp_path, tune_val_questions=5)
    vset = prepare_validation(settings, "handmade")
    registry = AdapterRegistry(tmp_path / "adapters")
    _fake_adapter(registry, "a")
    assert (
        recorded_score(registry.get("a"), vset) is None and known_base_rag(registry, vset) is None
    )
    record_score(registry, "a", vset, {"accuracy": 0.6, "f1": 0.5}, base_rag=0.4)
    assert recorded_score(registry.get("a"), vset)["accuracy"] == 0.6
    assert known_base_rag(registry, vset) == 0.4
    other = prepare_validation(settings.with_overrides(seed=7), "handmade")
    assert recorded_score(registry.get("a"), other) is None  # other questions: score again
    record_score(registry, "a", other, {"accuracy": 0.3}, base_rag=None)
    scores = registry.get("a").metadata["validation_scores"]
    assert len(scores) == 2 and recorded_score(registry.get("a"), vset)["accuracy"] == 0.6


# The promotion gate -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("candidate", "base_rag", "promoted", "margin", "promote"),
    [
        (0.60, 0.50, 0.55, 0.02, True),  # beats the better rival (promoted) by 5 points
        (0.56, 0.50, 0.55, 0.02, False),  # beats both, but by less than the margin
        (0.52, 0.50, None, 0.02, True),  # exactly the margin over base+RAG
        (0.51, 0.50, None, 0.02, False),
        (0.50, 0.50, None, 0.0, False),  # a tie is no win, even with no margin
        (0.70, 0.75, 0.40, 0.02, False),  # base+RAG is the bar when it beats the live adapter
    ],
)
def test_gate_needs_a_margin_over_both_rivals(candidate, base_rag, promoted, margin, promote):
    decision = gate_decision(candidate, base_rag, promoted, margin, promoted_name="live")
    assert decision.promote is promote and not decision.forced


def test_gate_says_why_with_the_three_figures_and_force_overrides_it():
    kept = gate_decision(0.56, 0.50, 0.55, 0.02, candidate_name="new", promoted_name="live")
    assert not kept.promote
    for figure in ("new 56.0%", "live 55.0%", "base+RAG 50.0%", "57.0%", "live stays live"):
        assert figure in kept.reason
    assert "--force" in kept.reason
    none_live = gate_decision(0.40, 0.50, None, 0.02)
    assert "no adapter promoted" in none_live.reason and "base+RAG (no adapter)" in none_live.reason
    forced = gate_decision(0.56, 0.50, 0.55, 0.02, force=True, promoted_name="live")
    assert forced.promote and forced.forced and "anyway because of --force" in forced.reason
    earned = gate_decision(0.90, 0.50, 0.55, 0.02, force=True)
    assert earned.promote and not earned.forced
    with pytest.raises(ConfigError, match="margin 2.0 must be a fraction"):
        gate_decision(0.5, 0.5, None, 2.0)


def test_gate_refuses_an_adapter_that_forgets_more_than_the_tolerance():
    # 0.70 vs base 0.74: 4 points lost, tolerance 3 -> kept out despite the accuracy gain.
    forgets = gate_decision(0.60, 0.50, None, 0.02, probe=0.70, probe_base=0.74, tolerance=0.03)
    assert not forgets.promote and "forgets too much" in forgets.reason
    assert "probe 70.0% vs base 74.0%" in forgets.reason and "--force" in forgets.reason
    within = gate_decision(0.60, 0.50, None, 0.02, probe=0.72, probe_base=0.74, tolerance=0.03)
    assert within.promote and within.probe == 0.72 and within.tolerance == 0.03
    forced = gate_decision(
        0.60, 0.50, None, 0.02, probe=0.50, probe_base=0.74, tolerance=0.03, force=True
    )
    assert forced.promote and forced.forced
    with pytest.raises(ConfigError, match="probe 74.0 must be a fraction"):
        gate_decision(0.6, 0.5, None, 0.02, probe=74.0, probe_base=0.74, tolerance=0.03)


# The grid -----------------------------------------------------------------------------------
def test_default_grid_is_lr_by_epochs_by_rank():
    settings = DocentSettings()
    combos = expand_grid(settings, grid_axes())
    assert combos == [
        {"train_lr": 1e-3, "train_epochs": 1.0, "train_lora_r": 16, "train_lora_alpha": 32},
        {"train_lr": 1e-3, "train_epochs": 2.0, "train_lora_r": 16, "train_lora_alpha": 32},
        {"train_lr": 3e-4, "train_epochs": 1.0, "train_lora_r": 16, "train_lora_alpha": 32},
        {"train_lr": 3e-4, "train_epochs": 2.0, "train_lora_r": 16, "train_lora_alpha": 32},
    ]


def test_grid_options_and_extra_axes():
    settings = DocentSettings()
    axes = grid_axes(
        ["raft_p_oracle=0.8,1.0", "train_target_modules=all-linear"],
        lr="2e-3",
        epochs="3,3",
        rank="8,32",
    )
    combos = expand_grid(settings, axes)
    assert len(combos) == 4  # 1 lr x 1 epoch (deduplicated) x 2 ranks x 2 P
    assert {c["train_lr"] for c in combos} == {2e-3} and {c["train_epochs"] for c in combos} == {
        3.0
    }
    # alpha follows the rank at the settings' alpha/r ratio (32/16): the LoRA scale stays put
    assert {(c["train_lora_r"], c["train_lora_alpha"]) for c in combos} == {(8, 16), (32, 64)}
    assert {c["raft_p_oracle"] for c in combos} == {0.8, 1.0}
    generic = grid_axes(["train_lr=5e-4,1e-4"])  # --grid may set a shortcut's axis too
    assert generic["train_lr"] == ["5e-4", "1e-4"] and list(generic)[0] == "train_lr"
    fixed_alpha = expand_grid(settings, grid_axes(["train_lora_alpha=16"], rank="8,32"))
    assert {c["train_lora_alpha"] for c in fixed_alpha} == {16}


@pytest.mark.parametrize(
    ("specs", "options", "match"),
    [
        (["train_lrr=1e-3"], {}, "no such setting.*did you mean train_lr"),
        (["top_k=3,5"], {}, "only train_\\* and raft_\\* settings"),
        (["raft_split=0.8"], {}, "cannot vary per candidate"),
        (["train_lr=fast"], {"lr": None}, "'fast' is not a valid value"),
        ([], {"lr": "-1e-3"}, "'-1e-3' is not a valid value.*greater than 0"),
        ([], {"rank": "8.5"}, "'8.5' is not a valid value"),
        (["raft_answer_style=poetic"], {}, "'poetic' is not a valid value"),
    ],
)
def test_bad_grids_are_refused_with_the_reason(specs, options, match):
    axes = grid_axes(specs, **options)
    with pytest.raises(ConfigError, match=match):
        expand_grid(DocentSettings(), axes)


@pytest.mark.parametrize(
    ("specs", "options", "match"),
    [
        (["train_lr"], {}, "write FIELD=VALUE"),
        (["=1e-3"], {}, "write FIELD=VALUE"),
        (["raft_p_oracle= , "], {}, "no values"),
        ([], {"epochs": ","}, "--epochs: no values"),
        (["raft_p_oracle=1", "raft_p_oracle=0.8"], {}, "given twice"),
        (["train_lr=1e-3"], {"lr": "3e-4"}, "same axis"),
    ],
)
def test_malformed_grid_options_are_refused(specs, options, match):
    with pytest.raises(ConfigError, match=match):
        grid_axes(specs, **options)


def test_an_empty_grid_is_refused():
    with pytest.raises(ConfigError, match="grid is empty"):
        expand_grid(DocentSettings(), {})


# Budget and early stopping ------------------------------------------------------------------
def test_budget_starts_a_candidate_only_if_the_slowest_so_far_would_fit():
    assert fits_budget(10_000, [500], None)  # no budget
    assert fits_budget(0, [], 60)  # nothing measured yet: the first candidate starts
    assert not fits_budget(61, [], 60)  # scoring base+RAG spent it all
    assert fits_budget(30, [20, 25], 60)  # 30 + 25 <= 60
    assert not fits_budget(30, [35, 10], 60)  # the slowest (35) would overrun


def test_early_stop_after_patience_candidates_without_a_better_one():
    assert not stalled([], 1)
    assert not stalled([0.5, 0.4], 2)
    assert stalled([0.5, 0.4, 0.5], 2)  # equal is no improvement
    assert not stalled([0.5, 0.4, 0.6], 2)
    assert stalled([0.6, 0.6], 1)


# The registry keeps what a rollback needs ---------------------------------------------------
def test_losers_can_be_removed_but_never_the_promoted_adapter(tmp_path):
    registry = AdapterRegistry(tmp_path / "adapters")
    for name in ("old", "live", "loser"):
        _fake_adapter(registry, name)
    registry.promote("old", "default")
    registry.promote("live", "default")
    registry.remove("loser")
    assert [a.name for a in registry.list()] == ["live", "old"]
    for name in ("live", "old"):
        with pytest.raises(AdapterError, match="it is kept"):
            registry.remove(name)


# The command line refuses bad input before loading anything ---------------------------------
def test_cli_refuses_bad_tune_and_promotion_options(tmp_path):
    runner = CliRunner()
    ws = ["--workspace", str(tmp_path)]
    bad = runner.invoke(app, [*ws, "tune", "--grid", "train_lrr=1e-3"])
    assert bad.exit_code == 1 and "did you mean train_lr" in bad.output
    both = runner.invoke(app, [*ws, "tune", "--force", "--no-promote"])
    assert both.exit_code == 1 and "--no-promote" in both.output
    lone = runner.invoke(app, [*ws, "train", "--force"])
    assert lone.exit_code == 1 and "add --promote" in lone.output


# raft_* axes ---------------------------------------------------------------------------------
def test_a_raft_axis_builds_a_set_per_value_with_the_same_splits(tmp_path, embedder):
    """No model is asked: human questions only (limit 0), as the tune's own set was built."""
    from docent.progress import no_progress
    from eval.tune import raft_set_for
    from ingest.pipeline import refresh_index
    from raft import show
    from raft.build import build_raft_set

    settings = DocentSettings(workspace=tmp_path / "ws", raft_split=(0.5, 0.34, 0.16),
                              **NO_MODEL_RECIPE)
    refresh_index([write_corpus(tmp_path / "docs", DOCS)], settings, embedder=embedder)
    build_raft_set(
        settings,
        qa_file=write_qa(tmp_path / "qa.jsonl", QA),
        name="teams",
        limit=0,
        embedder=embedder,
    )
    raft_dir = settings.workspace / "raft"
    base = raft_dir / "teams"
    same = raft_set_for(
        settings, base, {"raft_p_oracle": 1.0, "train_lr": 1e-3}, embedder, no_progress
    )
    assert same == "teams"  # the set already has P = 1.0 (the default)
    name = raft_set_for(settings, base, {"raft_p_oracle": 0.8}, embedder, no_progress)
    built = show.load_manifest(raft_dir / name)
    assert name != "teams" and built["params"]["raft_p_oracle"] == 0.8
    assert (raft_dir / "LATEST").read_text() == "teams"  # `docent train` still finds the tune's set

    def sources(folder: Path, split: str) -> set[str]:
        return {r["meta"]["source"] for r in show.load_examples(folder, split)}

    assert sources(raft_dir / name, "validation") == sources(base, "validation")
    assert sources(raft_dir / name, "train") == sources(base, "train")
    assert raft_set_for(settings, base, {"raft_p_oracle": 0.8}, embedder, no_progress) == name


# End to end ---------------------------------------------------------------------------------
DOCS = {
    f"team{i}.md": f"# Team {i}\n\nTeam {i} meets on floor {i + 2}. Team {i} has a budget of "
    f"{100 * (i + 1)} EUR per month."
    for i in range(6)
}
QA = [
    (
        f"Which floor does Team {i} meet on?",
        f"floor {i + 2}",
        f"team{i}.md",
        f"Team {i} meets on floor {i + 2}.",
    )
    for i in range(6)
] + [
    (
        f"What budget does Team {i} have?",
        f"{100 * (i + 1)} EUR per month",
        f"team{i}.md",
        f"Team {i} has a budget of {100 * (i + 1)} EUR per month.",
    )
    for i in range(6)
]


@pytest.mark.slow
def test_tune_trains_scores_keeps_the_best_and_reports_the_gate(
    tmp_path, embedder, hf_serving_engine
):
    from eval.tune import run_tune
    from ingest.pipeline import refresh_index
    from raft.build import build_raft_set

    settings = DocentSettings(
        workspace=tmp_path / "ws",
        raft_distractors=2,
        top_k=3,
        raft_split=(0.5, 0.34, 0.16),  # 6 documents: 3 train, 2 validation, 1 test
        raft_refusal_fraction=0.0,
        train_max_steps=1,
        train_batch_size=2,
        train_max_length=1024,
        tune_val_questions=4,
        **NO_MODEL_RECIPE,
    )
    refresh_index([write_corpus(tmp_path / "docs", DOCS)], settings, embedder=embedder)
    qa = write_qa(tmp_path / "qa.jsonl", QA)
    build_raft_set(settings, qa_file=qa, name="teams", limit=0, embedder=embedder)

    result = run_tune(
        settings,
        grid_axes(lr="1e-3,3e-4", epochs="1", rank="8"),
        engine=hf_serving_engine,
        embedder=embedder,
        max_tokens=24,
    )
    assert [c.overrides["train_lr"] for c in result.candidates] == [1e-3, 3e-4]
    assert result.stopped == "the grid is done" and result.validation["questions"] == 4
    best = result.best_candidate
    assert best is not None and best.accuracy == max(c.accuracy for c in result.candidates)

    registry = AdapterRegistry(settings.workspace / "adapters")
    assert [a.name for a in registry.list()] == [best.name]  # the loser is deleted
    meta = registry.get(best.name).metadata
    (record,) = meta["validation_scores"].values()
    assert record["accuracy"] == best.accuracy and record["base_rag_accuracy"] == result.base_rag
    assert record["key"]["dataset"] == "teams" and meta["tune"]["overrides"] == best.overrides

    decision = result.decision
    assert decision is not None and decision.promoted is None  # nothing was live before
    expected = gate_decision(best.accuracy, result.base_rag, None, settings.promote_margin)
    assert decision.promote == expected.promote and not decision.forced
    assert registry.promoted() is None  # the gate decides; promoting is the caller's step

    folder = Path(result.folder)
    report = (folder / "report.md").read_text()
    assert f"`{best.name}` ★" in report and "| val accuracy |" in report
    assert decision.reason in report and "base+RAG validation accuracy" in report
    assert (folder / "accuracy.png").stat().st_size > 1000
    saved = json.loads((folder / "tune.json").read_text())
    assert saved["best"] == best.name and saved["decision"]["promote"] == decision.promote
    assert [c["kept"] for c in saved["candidates"]] == [
        c["name"] == best.name for c in saved["candidates"]
    ]
