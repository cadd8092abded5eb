"""The eval report: ``report.md``, ``report.html`` (plots inline), ``eval.json`` and PNG plots
in ``<workspace>/reports/eval-<time>/``."""

from __future__ import annotations

import base64
import html
import json
from datetime import UTC, datetime
from pathlib import Path

from eval.runner import EvalResult

COLUMNS = [
    ("accuracy", "accuracy (gold in final answer)"),
    ("exact_match", "EM (final answer)"),
    ("f1", "F1 (final answer)"),
    ("accuracy_whole_output", "gold anywhere in output"),
    ("answer_rate", "answer rate"),
    ("precision", "precision when answering"),
    ("declined_unanswerable", "declined unanswerable"),
    ("quotes_grounded", "quotes found in context"),
    ("answers_with_citation", "answers with a citation"),
    ("ungrounded_answers", "answers no document supports"),
    ("cited_gold_source", "cited the gold source"),
    ("completion_tokens", "tokens / answer"),
]
# What the headline and the first column count; printed under the table and in the headline.
FINAL_ANSWER = "the `<ANSWER>:` line, or the first sentence of an output without one"


def pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def table(result: EvalResult) -> str:
    head = "| system | " + " | ".join(label for _, label in COLUMNS) + " |"
    rule = "|---|" + "---:|" * len(COLUMNS)
    rows = []
    for system, scores in result.systems.items():
        # .get: an eval.json written before a column existed still prints (as 0).
        cells = [
            f"{scores.get(key, 0.0):.0f}"
            if key == "completion_tokens"
            else pct(scores.get(key, 0.0))
            for key, _ in COLUMNS
        ]
        rows.append(f"| {system} | " + " | ".join(cells) + " |")
    return "\n".join([head, rule, *rows])


def headline(result: EvalResult) -> list[str]:
    lines = []
    s = result.systems
    if "raft+rag" in s and "base+rag" in s:
        raft, base = s["raft+rag"], s["base+rag"]
        gain = 100 * (raft["accuracy"] - base["accuracy"])
        lines.append(
            f"RAFT+RAG vs base+RAG: {pct(raft['accuracy'])} vs {pct(base['accuracy'])} "
            f"accuracy, gold in the final answer ({gain:+.1f} points); gold anywhere in the "
            f"output: {pct(raft.get('accuracy_whole_output', 0.0))} vs "
            f"{pct(base.get('accuracy_whole_output', 0.0))}; "
            f"RAFT+RAG quotes found in its context: {pct(raft['quotes_grounded'])}."
        )
    if result.forgetting.get("raft") is not None:
        f = result.forgetting
        paired = (f" ({f['lost']:.0f} lost, {f['gained']:.0f} gained)"
                  if "lost" in f and "gained" in f else "")
        lines.append(
            f"Forgetting probe ({f['probes']:.0f} general questions, no documents): base "
            f"{pct(f['base'])}, tuned {pct(f['raft'])}{paired}."
        )
    return lines


def where(result: EvalResult) -> str:
    """Where the answers came from: engine, dtype, how the adapter ran, and the machine, so
    figures from different machines are never compared blind."""
    from docent.hardware import summary

    st = result.settings
    hardware = st.get("hardware")
    reused = st.get("answers_reused", 0)
    kept = f"; {reused} answers reused from an earlier run" if reused else ""
    return (
        f"engine {st.get('engine')} ({st.get('dtype')}, adapter as "
        f"{st.get('adapter_weights', 'lora')}) on {summary(hardware) if hardware else '?'}"
        f"{kept}"
    )


def _plots(result: EvalResult, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    systems = list(result.systems)
    fig, ax = plt.subplots(figsize=(7, 3.6))
    keys = [
        ("accuracy", "accuracy (final answer)"),
        ("f1", "F1"),
        ("quotes_grounded", "quotes grounded"),
    ]
    width = 0.8 / len(keys)
    for i, (key, label) in enumerate(keys):
        xs = [j + i * width for j in range(len(systems))]
        ax.bar(xs, [100 * result.systems[s][key] for s in systems], width, label=label)
    ax.set_xticks([j + width * (len(keys) - 1) / 2 for j in range(len(systems))], systems)
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.set_title(f"{result.answerable} answerable questions, k={result.settings['k']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    made.append(folder / "systems.png")
    fig.savefig(made[-1], dpi=120)
    plt.close(fig)
    if result.sweep:
        fig, ax = plt.subplots(figsize=(6, 3.4))
        for system, points in result.sweep.items():
            xs = [int(n) for n in points]
            ax.plot(xs, [100 * v for v in points.values()], marker="o", label=system)
        ax.set_xlabel("distractor chunks beside the oracle")
        ax.set_ylabel("accuracy %")
        ax.set_ylim(0, 100)
        ax.legend()
        fig.tight_layout()
        made.append(folder / "sweep.png")
        fig.savefig(made[-1], dpi=120)
        plt.close(fig)
    return made


def markdown(result: EvalResult, plots: list[Path]) -> str:
    r = result.retrieval
    parts = [
        "# Docent eval",
        "",
        f"{result.answerable} answerable + {result.unanswerable} unanswerable questions from "
        f"`{result.settings['qa_file']}` (split {result.settings['split']}); adapter "
        f"`{result.adapter or 'none'}`; greedy, "
        f"{result.settings['max_tokens']} tokens at most; {result.seconds:.0f} s.",
        "",
        f"Ran on: {where(result)}.",
        "",
        *[f"**{line}**" for line in headline(result)],
        "",
        "## Answers",
        "",
        table(result),
        "",
        f"Accuracy, EM and F1 score the final answer only ({FINAL_ANSWER}), so an output "
        'cannot score by rambling through every candidate; "gold anywhere in output" is the '
        "lenient figure that counts a gold mentioned anywhere. Accuracy counts every answerable "
        'question (declining is wrong); precision, citations and "answers no document '
        'supports" only the answered ones. A citation is a quote found in a retrieved chunk or '
        "the retrieved sentence Docent attributes the answer to, as served answers show. "
        "Closed-book systems get the trained template with no documents.",
    ]
    if r:
        parts += [
            "",
            "## Retrieval (gold source)",
            "",
            "| recall@1 | recall@5 | recall@10 | MRR | nDCG@10 |",
            "|---:|---:|---:|---:|---:|",
            f"| {pct(r['recall@1'])} | {pct(r['recall@5'])} | {pct(r['recall@10'])} | "
            f"{r['mrr']:.3f} | {r['ndcg@10']:.3f} |",
        ]
    if result.sweep:
        ns = list(next(iter(result.sweep.values())))
        parts += ["", "## Distractor sweep (oracle + N distractors; gold in the final answer)", "",
                  "| system | " + " | ".join(f"N={n}" for n in ns) + " |",
                  "|---|" + "---:|" * len(ns)]
        for system, points in result.sweep.items():
            parts.append(f"| {system} | " + " | ".join(pct(v) for v in points.values()) + " |")
    if result.forgetting:
        parts += ["", "## Forgetting probe", "",
                  " · ".join(f"{k}: {pct(v)}" for k, v in result.forgetting.items()
                             if k not in ("probes", "lost", "gained"))]
    parts += ["", *[f"![{p.stem}]({p.name})" for p in plots], ""]
    return "\n".join(parts)


def write_report(result: EvalResult, reports_dir: Path) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    folder = reports_dir / f"eval-{stamp}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "eval.json").write_text(json.dumps(result.as_dict(), indent=2))
    plots = _plots(result, folder)
    md = markdown(result, plots)
    (folder / "report.md").write_text(md)
    (folder / "report.html").write_text(_html(md, plots))
    latest = reports_dir / "eval-latest.json"
    latest.write_text(json.dumps({"folder": folder.name, **result.as_dict()}, indent=2))
    return folder


def _html(md: str, plots: list[Path]) -> str:
    """A self-contained page: markdown tables become HTML tables, plots are inlined."""
    body: list[str] = []
    rows: list[list[str]] = []

    def flush() -> None:
        if rows:
            head, *rest = rows
            body.append("<table><tr>" + "".join(f"<th>{c}</th>" for c in head) + "</tr>")
            body.extend("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rest)
            body.append("</table>")
            rows.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            cells = [html.escape(c.strip()) for c in line.strip("|").split("|")]
            if not all(set(c) <= set("-:") for c in cells):
                rows.append(cells)
            continue
        flush()
        if line.startswith("!["):
            continue
        if line.startswith("## "):
            body.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.strip():
            text = html.escape(line).replace("**", "")
            body.append(f"<p>{text}</p>")
    flush()
    for p in plots:
        data = base64.b64encode(p.read_bytes()).decode()
        body.append(f'<img alt="{p.stem}" src="data:image/png;base64,{data}">')
    style = (
        "body{font-family:system-ui,sans-serif;max-width:70rem;margin:2rem auto;padding:0 1rem}"
        "table{border-collapse:collapse;margin:1rem 0}td,th{border:1px solid #ccc;"
        "padding:.3rem .6rem;text-align:right}td:first-child,th:first-child{text-align:left}"
        "img{max-width:100%}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>Docent eval</title>"
        f"<style>{style}</style></head><body>{''.join(body)}</body></html>"
    )
