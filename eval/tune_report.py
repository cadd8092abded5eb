"""The ``docent tune`` report: a results table and an accuracy plot in markdown."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from eval.tune import TuneResult

PLOT = "accuracy.png"


def pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def results_table(result: TuneResult) -> str:
    """One row per candidate: its settings, validation scores, training figures."""
    fields = list(result.axes)
    head = [
        "#",
        "adapter",
        *fields,
        "val accuracy",
        "F1",
        "answered",
        "steps",
        "best val loss",
        "time (s)",
        "kept",
    ]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 3) + "---|"]
    for c in result.candidates:
        star = " ★" if c.name == result.best else ""
        cells = [
            str(c.number),
            f"`{c.name}`{star}",
            *(str(c.overrides.get(f, "")) for f in fields),
            pct(c.accuracy),
            pct(c.f1),
            pct(c.answer_rate),
            str(c.steps),
            "" if c.best_eval_loss is None else f"{c.best_eval_loss:.3f}",
            f"{c.seconds:.0f}",
            "yes" if c.kept else "deleted",
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def promotion_line(result: TuneResult) -> str:
    decision = result.decision
    if decision is None:
        return "not asked (--no-promote)"
    verdict = (
        "promoted (forced)"
        if decision.forced
        else "promoted"
        if decision.promote
        else ("not promoted")
    )
    return f"{verdict}: {decision.reason}"


def _plot(result: TuneResult, folder: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"c{c.number:02d}" for c in result.candidates]
    values = [100 * c.accuracy for c in result.candidates]
    colours = ["#2ca02c" if c.name == result.best else "#1f77b4" for c in result.candidates]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * len(labels) + 3), 4))
    bars = ax.bar(labels, values, color=colours)
    ax.bar_label(bars, fmt="%.0f%%")  # a 0% bar is otherwise invisible
    ax.axhline(100 * result.base_rag, color="#d62728", linestyle="--", label="base+RAG")
    decision = result.decision
    if decision is not None and decision.promoted is not None:
        ax.axhline(
            100 * decision.promoted,
            color="#7f7f7f",
            linestyle=":",
            label=f"promoted ({decision.promoted_name})",
        )
    ax.set_ylim(0, 100)
    ax.set_xlabel("candidate (see the table)")
    ax.set_ylabel("validation accuracy, raft+rag (%)")
    ax.set_title(f"{result.id}: {result.validation['questions']} validation questions")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper right")
    fig.tight_layout()
    path = folder / PLOT
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown(result: TuneResult) -> str:
    v = result.validation
    grid = " × ".join(f"{k} {{{', '.join(map(str, vals))}}}" for k, vals in result.axes.items())
    best = result.best_candidate
    lines = [
        f"# Tune report: {result.id}",
        "",
        f"- RAFT set `{result.dataset}`; validation: {v['questions']} questions (cap "
        f"{v['questions_cap']}, seed {v['seed']}, k={v['k']}, {v['max_tokens']} tokens per "
        f"answer), generator `{v['generator']}`",
        f"- grid: {grid} = {result.planned} candidates; ran {len(result.candidates)} in "
        f"{result.seconds:.0f} s ({result.stopped})",
        f"- base+RAG validation accuracy: {pct(result.base_rag)}",
        f"- best: `{result.best}` at {pct(best.accuracy)}" if best else "- best: none",
        f"- promotion: {promotion_line(result)}",
        "",
        f"![validation accuracy per candidate]({PLOT})",
        "",
        results_table(result),
        "",
    ]
    return "\n".join(lines)


def write_tune_report(result: TuneResult, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tune.json").write_text(json.dumps(result.as_dict(), indent=2, default=str))
    _plot(result, folder)
    (folder / "report.md").write_text(markdown(result))
    return folder
