"""The ``docent`` command line. Builds one ``DocentSettings`` and hands it to each stage."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from docent.errors import DocentError
from docent.settings import DocentSettings

T = TypeVar("T")

app = typer.Typer(
    help="Docent: teach a language model a domain and answer questions about it.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
out = Console()

WorkspaceOpt = Annotated[
    Path | None,
    typer.Option(
        "--workspace",
        "-w",
        help="Workspace folder [env: DOCENT_WORKSPACE / DOCENT_HOME; default ./.docent]",
    ),
]


StoreOpt = Annotated[
    str | None,
    typer.Option(
        "--store",
        help="Knowledge store: 'embedded' (FAISS + SQLite in the workspace) or a "
        "postgresql://… URL shared by several replicas [env: DOCENT_STORE]",
    ),
]


@app.callback()
def main(
    ctx: typer.Context,
    workspace: WorkspaceOpt = None,
    store: StoreOpt = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    # Offline by design: nothing may be fetched from a model hub at run time.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # vLLM logs each load step (and a warning per upcast weight); its workers read this at
    # import. -v shows everything.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "DEBUG" if verbose else "ERROR")
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not verbose:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        import datasets

        datasets.disable_progress_bars()
    for noisy in ("bm25s", "sentence_transformers", "transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose else logging.WARNING)
    try:
        ctx.obj = DocentSettings().with_overrides(workspace=workspace, store=store)
    except ValueError as exc:
        _fail(f"invalid settings: {exc}")


def _settings(ctx: typer.Context, **overrides: Any) -> DocentSettings:
    try:
        return ctx.obj.with_overrides(**overrides)  # type: ignore[no-any-return]
    except ValueError as exc:
        _fail(f"invalid option: {exc}")
        raise  # unreachable


def _fail(message: str, code: int = 1) -> None:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


class _RichProgress:
    """Adapts the stages' ``progress(stage, done, total)`` callback to rich bars."""

    LABELS = {
        "read": "Reading & chunking",
        "embed": "Embedding",
        "index": "Indexing",
        "tune": "Candidates",
    }

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tasks: dict[str, Any] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(self.LABELS.get(stage, stage), total=total)
        self.progress.update(self.tasks[stage], completed=done, total=max(total, 1))


def _run_stage(stage: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a long stage with rich progress bars; a DocentError becomes one clear line."""
    try:
        with _progress() as progress:
            return stage(*args, progress=_RichProgress(progress), **kwargs)
    except DocentError as exc:
        _fail(str(exc))
        raise  # unreachable: _fail exits


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold blue]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=not sys.stderr.isatty() and not os.environ.get("DOCENT_PROGRESS"),
    )


@app.command()
def ingest(
    ctx: typer.Context,
    paths: Annotated[list[Path], typer.Argument(help="Files or folders to ingest.")],
    collection: Annotated[
        str, typer.Option(help="Collection the documents belong to.")
    ] = "default",
    rebuild: Annotated[bool, typer.Option(help="Re-embed everything from scratch.")] = False,
    chunk_size: Annotated[int | None, typer.Option(help="Chunk size in tokens.")] = None,
    chunk_overlap: Annotated[int | None, typer.Option(help="Chunk overlap in tokens.")] = None,
    index_type: Annotated[str | None, typer.Option(help="auto, flat, hnsw or ivf.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Embedding batch size.")] = None,
    precision: Annotated[
        str | None,
        typer.Option(
            help="Embedding precision: auto, fp32, bf16 or int8 (a change needs --rebuild)."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Read, chunk and embed documents; re-running only re-embeds what changed."""
    from docent import pg
    from ingest.pipeline import refresh_index

    settings = _settings(
        ctx,
        chunk_size=chunk_size,
        chunk_overlap=chunk_overlap,
        index_type=index_type,
        embed_batch_size=batch_size,
        embed_precision=precision,
    )
    report = _run_stage(refresh_index, paths, settings, collection=collection, rebuild=rebuild)
    if as_json:
        out.print_json(json.dumps(report.as_dict()))
        return
    where = pg.redact(settings.store) if settings.uses_postgres else settings.workspace / "index"
    table = Table(title=f"Ingest → {where} ({report.version})")
    for col in ("added", "updated", "removed", "unchanged", "embedded", "skipped"):
        table.add_column(col, justify="right")
    table.add_row(
        *(
            str(getattr(report, c))
            for c in ("added", "updated", "removed", "unchanged", "embedded")
        ),
        str(len(report.skipped)),
    )
    out.print(table)
    status = "published" if report.published else "nothing changed; index left as it was"
    out.print(
        f"{report.documents} documents, {report.total_chunks} chunks, "
        f"{report.index_type} index, {report.seconds:.1f}s: {status}"
    )
    for source, reason in report.skipped:
        out.print(f"[yellow]skipped[/] {source}: {reason}")


@app.command()
def search(
    ctx: typer.Context,
    query: Annotated[str, typer.Argument(help="The question.")],
    k: Annotated[int | None, typer.Option("-k", "--top-k", help="Number of results.")] = None,
    mode: Annotated[str | None, typer.Option(help="hybrid, dense or bm25.")] = None,
    fusion: Annotated[str | None, typer.Option(help="Hybrid fusion: rrf or dbsf.")] = None,
    source: Annotated[list[str] | None, typer.Option(help="Only these sources.")] = None,
    section: Annotated[str | None, typer.Option(help="Section contains this text.")] = None,
    collection: Annotated[list[str] | None, typer.Option(help="Only these collections.")] = None,
    rerank: Annotated[bool | None, typer.Option(help="Use the configured reranker.")] = None,
    reranker: Annotated[str | None, typer.Option(help="Cross-encoder model.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Find the chunks that matter for a question."""
    from retrieval import Filters, Retriever

    settings = _settings(ctx, top_k=k, search_mode=mode, fusion=fusion, reranker=reranker)
    try:
        retriever = Retriever.from_settings(settings)
        hits = retriever.search(
            query, filters=Filters.of(source, section, collection), rerank=rerank
        )
    except DocentError as exc:
        _fail(str(exc))
    if as_json:
        out.print_json(
            json.dumps(
                {"query": query, "version": retriever.version, "hits": [h.as_dict() for h in hits]}
            )
        )
        return
    table = Table(title=f"{settings.search_mode} search: {query}", show_lines=True)
    for col in ("#", "score", "source", "section", "snippet"):
        table.add_column(col)
    for rank, hit in enumerate(hits, start=1):
        where = hit.source + (f" p.{hit.page}" if hit.page else "")
        table.add_row(str(rank), f"{hit.score:.3f}", where, hit.section or "", hit.snippet())
    out.print(table)
    if not hits:
        out.print("[yellow]no matching chunks[/]")


raft_app = typer.Typer(help="RAFT training sets: build and inspect.", no_args_is_help=True)
app.add_typer(raft_app, name="raft")


@raft_app.command("build")
def raft_build(
    ctx: typer.Context,
    questions_per_chunk: Annotated[int | None, typer.Option(help="Questions per chunk.")] = None,
    distractors: Annotated[int | None, typer.Option(help="K distractor chunks.")] = None,
    p_oracle: Annotated[float | None, typer.Option(help="Fraction P with the oracle.")] = None,
    refusal_fraction: Annotated[float | None, typer.Option(help="Refusal examples.")] = None,
    hard_negatives: Annotated[float | None, typer.Option(help="Hard-negative share.")] = None,
    teacher: Annotated[
        str, typer.Option("--teacher", "--teacher-url", help="local, or an OpenAI-compatible URL.")
    ] = "local",
    teacher_model: Annotated[str | None, typer.Option(help="Model name at the URL.")] = None,
    engine: Annotated[str | None, typer.Option(help="Local engine: auto, vllm or hf.")] = None,
    answer_style: Annotated[str | None, typer.Option(help="auto, extractive or teacher.")] = None,
    limit: Annotated[int | None, typer.Option(help="Use at most N chunks.")] = None,
    fmt: Annotated[str | None, typer.Option("--format", help="chat, completion or hf.")] = None,
    cot_format: Annotated[
        str | None,
        typer.Option(help="Target answers: reasoning, quote, answer_first or own_words."),
    ] = None,
    qa_file: Annotated[Path | None, typer.Option(help="Human questions (train split).")] = None,
    feedback: Annotated[
        Path | None,
        typer.Option(help="Corrections exported by the API (GET /v1/feedback/export)."),
    ] = None,
    name: Annotated[str | None, typer.Option(help="Dataset name (default: dated).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for mixing and splits.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted build.")] = False,
    refresh: Annotated[
        bool, typer.Option(help="Rebuild the latest set after an index change.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Generate questions from chunks, verified CoT answers and RAFT examples."""
    from raft.build import build_raft_set

    remote = teacher != "local"
    settings = _settings(
        ctx,
        raft_questions_per_chunk=questions_per_chunk,
        raft_distractors=distractors,
        raft_p_oracle=p_oracle,
        raft_refusal_fraction=refusal_fraction,
        raft_hard_negatives=hard_negatives,
        raft_answer_style=answer_style,
        raft_format=fmt,
        raft_cot_format=cot_format,
        seed=seed,
        llm_url=teacher if remote else None,
        llm_model=teacher_model,
        engine="openai" if remote else engine,
    )
    report = _run_stage(
        build_raft_set,
        settings,
        limit=limit,
        name=name,
        resume=resume,
        refresh=refresh,
        qa_file=qa_file,
        feedback_file=feedback,
    )
    if as_json:
        out.print_json(json.dumps(report.as_dict()))
        return
    out.print(f"[bold]{report.name}[/] → {report.folder}")
    out.print(
        f"examples: {report.examples}  kinds: {report.kinds}  "
        f"oracle fraction {report.oracle_fraction:.2f}"
    )
    out.print(
        f"chunks: {report.chunks_generated} generated, {report.chunks_reused} reused "
        f"(of {report.chunks_total}); questions: {report.questions_generated} proposed, "
        f"{report.questions_accepted} accepted, {report.human_questions} human"
    )
    if report.rejections:
        out.print("rejected: " + ", ".join(f"{k} {v}" for k, v in report.rejections.items()))
    if report.dropped_deleted_oracle:
        out.print(f"dropped {report.dropped_deleted_oracle} oracle chunk(s) deleted from the index")


@raft_app.command("show")
def raft_show(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Argument(help="Set name (default: the latest).")] = None,
    split: Annotated[str, typer.Option(help="train, validation or test.")] = "train",
    n: Annotated[int, typer.Option("-n", help="Examples to print.")] = 2,
) -> None:
    """Stats and a few colourised examples of a RAFT set."""
    from raft import show

    raft_dir = ctx.obj.workspace / "raft"
    try:
        folder = show.resolve(raft_dir, name)
    except DocentError as exc:
        _fail(str(exc))
    manifest = show.load_manifest(folder)
    report = manifest.get("report", {})
    table = Table(title=f"RAFT set {folder.name}")
    table.add_column("field")
    table.add_column("value")
    for key in ("created", "index_version", "teacher", "answer_style", "format", "dataset_hash"):
        table.add_row(key, str(manifest.get(key)))
    for key in (
        "examples",
        "kinds",
        "oracle_fraction",
        "questions_generated",
        "questions_accepted",
        "human_questions",
        "rejections",
    ):
        table.add_row(key, str(report.get(key)))
    table.add_row("params", json.dumps(manifest.get("params")))
    out.print(table)
    for record in show.load_examples(folder, split)[:n]:
        meta = record["meta"]
        out.rule(f"{record['id']} · {meta['kind']} · {meta['source']}")
        out.print(f"[bold]Q:[/] {meta['question']}")
        out.print(
            f"context: {len(meta['context_chunks'])} chunks, oracle "
            f"{'included' if meta['has_oracle'] else 'absent'}"
        )
        out.print(show.highlight(show.assistant_text(record)))


@app.command()
def train(
    ctx: typer.Context,
    dataset: Annotated[str | None, typer.Option(help="RAFT set name (default: latest).")] = None,
    base: Annotated[str | None, typer.Option(help="Base model (default: the generator).")] = None,
    epochs: Annotated[float | None, typer.Option(help="Training epochs.")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Stop after N steps.")] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate.")] = None,
    lora_r: Annotated[int | None, typer.Option(help="LoRA rank.")] = None,
    lora_alpha: Annotated[int | None, typer.Option(help="LoRA alpha.")] = None,
    target_modules: Annotated[str | None, typer.Option(help="all-linear or names.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Packed rows per step.")] = None,
    grad_accum: Annotated[int | None, typer.Option(help="Gradient accumulation.")] = None,
    max_length: Annotated[int | None, typer.Option(help="Tokens per packed row.")] = None,
    eval_steps: Annotated[int | None, typer.Option(help="Validate every N steps.")] = None,
    qlora: Annotated[bool, typer.Option(help="4-bit base (CUDA only).")] = False,
    rehearsal: Annotated[
        float | None,
        typer.Option(
            help="Share of the mix replaying the base model's own general answers "
            "(0 to 0.5; against forgetting)."
        ),
    ] = None,
    name: Annotated[str | None, typer.Option(help="Adapter name.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run.")] = False,
    merge: Annotated[bool, typer.Option(help="Also write a merged full model.")] = False,
    method: Annotated[
        str,
        typer.Option(
            help="sft: LoRA on a RAFT set. dpo: preference tuning (TRL DPOTrainer) on "
            "top of an SFT adapter, which is also the reference model."
        ),
    ] = "sft",
    sft: Annotated[
        str | None,
        typer.Option(
            help="With --method dpo: the SFT adapter to start from (default: the "
            "promoted one, else the newest)."
        ),
    ] = None,
    pairs: Annotated[
        Path | None,
        typer.Option(
            help="With --method dpo: preference pairs JSONL (default: made now from "
            "users' feedback and the SFT adapter's wrong answers on the train split)."
        ),
    ] = None,
    beta: Annotated[float | None, typer.Option(help="With --method dpo: DPO beta.")] = None,
    promote: Annotated[
        bool,
        typer.Option(
            help="Promote the adapter when done, if its validation accuracy beats the promoted "
            "adapter and base+RAG by DOCENT_PROMOTE_MARGIN."
        ),
    ] = False,
    force: Annotated[
        bool, typer.Option(help="With --promote: promote even when the validation gate says no.")
    ] = False,
    engine: Annotated[
        str | None,
        typer.Option(help="Engine answering the validation questions: auto, vllm, hf or openai."),
    ] = None,
) -> None:
    """Fine-tune the base model on a RAFT set with LoRA (or, with --method dpo, tune an SFT
    adapter on preference pairs); the adapter joins the registry. Runs unchanged under
    `accelerate launch` (configs in configs/accelerate/): the main process writes, the others
    train."""
    from raft.distributed import is_main_process
    from raft.train import train_adapter

    if force and not promote:
        _fail("--force only changes what --promote does: add --promote")
    if method not in ("sft", "dpo"):
        _fail(f"--method {method!r}: use sft or dpo")
    if method == "sft" and (sft or pairs or beta is not None):
        _fail("--sft, --pairs and --beta belong to --method dpo")
    settings = _settings(
        ctx,
        generator=base,
        train_epochs=epochs,
        train_max_steps=max_steps,
        train_lr=lr,
        train_lora_r=lora_r,
        train_lora_alpha=lora_alpha,
        train_target_modules=target_modules,
        train_batch_size=batch_size,
        train_grad_accum=grad_accum,
        train_max_length=max_length,
        train_eval_steps=eval_steps,
        train_qlora=qlora or None,
        train_rehearsal=rehearsal,
        dpo_beta=beta,
        engine=engine,
    )
    if method == "dpo":
        result = _train_dpo(settings, sft, pairs, name, resume)
    else:
        result = _run_stage(
            train_adapter, settings, dataset=dataset, name=name, resume=resume, merge=merge
        )
    if not is_main_process():
        return  # under `accelerate launch`: the gate and the summary are the main process's
    promoted = promote and _gated_promote(settings, result.name, result.dataset, force)
    out.print(f"[bold]{result.name}[/] → {result.path}")
    processes = _processes(result)
    out.print(
        f"{result.steps} steps{processes} in {result.seconds}s ({result.tokens_per_s} tokens/s); "
        f"train loss {result.train_loss_first} → {result.train_loss_last}; "
        f"best validation loss {result.best_eval_loss}"
    )
    out.print(f"report: {result.path}/report.md" + (" · promoted" if promoted else ""))


def _processes(result: Any) -> str:
    """`` on 2 processes (effective batch 8)`` for a run spread by `accelerate launch`."""
    if result.processes <= 1:
        return ""
    return f" on {result.processes} processes (effective batch {result.effective_batch})"


def _train_dpo(
    settings: DocentSettings, sft: str | None, pairs: Path | None, name: str | None, resume: bool
) -> Any:
    """``train --method dpo``: pairs made now (unless given), then DPO from the SFT adapter."""
    from datetime import UTC, datetime

    from docent.loop import collect_pairs
    from raft.distributed import on_main
    from raft.dpo import train_dpo
    from raft.registry_store import open_registry

    registry = open_registry(settings)
    try:
        info = registry.get(sft) if sft else (registry.promoted() or registry.latest())
    except DocentError as exc:
        _fail(str(exc))
        raise  # unreachable
    if info is None:
        _fail("no SFT adapter to start from: train one first (`docent train`)")
        raise typer.Exit(1)  # unreachable
    sft_info = info
    if pairs is None:

        def make_pairs() -> Path:
            stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
            path = settings.workspace / "preferences" / f"{sft_info.name}-{stamp}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with _progress() as progress:
                made = collect_pairs(
                    settings,
                    sft_info.name,
                    str(sft_info.metadata.get("dataset")),
                    path,
                    progress=_RichProgress(progress),
                )
            out.print(f"{made['count']} preference pairs {made['by_origin']} → {path}")
            return path

        try:  # made once, by the main process under `accelerate launch`
            pairs = on_main(make_pairs)
        except DocentError as exc:
            _fail(str(exc))
            raise  # unreachable
    elif not pairs.exists():
        _fail(f"--pairs {pairs} does not exist")
    return _run_stage(train_dpo, settings, sft=info.name, pairs=pairs, name=name)


@app.command()
def tune(
    ctx: typer.Context,
    dataset: Annotated[str | None, typer.Option(help="RAFT set name (default: latest).")] = None,
    lr: Annotated[
        str | None, typer.Option(help="Learning rates, comma-separated (default 1e-3,3e-4).")
    ] = None,
    epochs: Annotated[
        str | None, typer.Option(help="Epoch counts, comma-separated (default 1,2).")
    ] = None,
    rank: Annotated[
        str | None, typer.Option(help="LoRA ranks, comma-separated (default 16).")
    ] = None,
    grid: Annotated[
        list[str] | None,
        typer.Option(
            help="Another axis, FIELD=V1,V2 for any train_* or raft_* setting (repeatable), "
            "e.g. --grid raft_p_oracle=0.8,1.0 (a raft_* axis builds a RAFT set per value)."
        ),
    ] = None,
    max_steps: Annotated[
        int | None, typer.Option(help="Stop each candidate after N steps.")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Rows per step.")] = None,
    max_length: Annotated[int | None, typer.Option(help="Tokens per row.")] = None,
    budget_minutes: Annotated[
        float | None,
        typer.Option(help="Start no candidate that would end after this many minutes."),
    ] = None,
    patience: Annotated[
        int | None, typer.Option(help="Stop after N candidates in a row without a better one.")
    ] = None,
    val_questions: Annotated[
        int | None, typer.Option(help="Validation questions each candidate answers.")
    ] = None,
    margin: Annotated[
        float | None, typer.Option(help="Promotion margin over the live adapter and base+RAG.")
    ] = None,
    keep_all: Annotated[
        bool, typer.Option("--keep-all", help="Keep every candidate, not only the best.")
    ] = False,
    promote: Annotated[
        bool, typer.Option(help="Promote the best if it passes the validation gate.")
    ] = True,
    force: Annotated[
        bool, typer.Option(help="Promote the best even when the gate says no.")
    ] = False,
    engine: Annotated[
        str | None,
        typer.Option(help="Engine answering the validation questions: auto, vllm, hf or openai."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Grid search over training settings, each candidate scored by validation ANSWER
    accuracy (retrieval + the tuned model); the best is kept and, if it beats the live
    adapter and base+RAG, promoted. A report with a table and a plot goes to reports/."""
    from eval.tune import grid_axes, run_tune
    from eval.tune_report import results_table

    if force and not promote:
        _fail("--force promotes past the gate, but --no-promote asks for no promotion: drop one")
    settings = _settings(
        ctx,
        train_max_steps=max_steps,
        train_batch_size=batch_size,
        train_max_length=max_length,
        tune_patience=patience,
        tune_val_questions=val_questions,
        promote_margin=margin,
        engine=engine,
    )
    try:
        axes = grid_axes(grid or [], lr=lr, epochs=epochs, rank=rank)
    except DocentError as exc:
        _fail(str(exc))
    result = _run_stage(
        run_tune,
        settings,
        axes,
        dataset=dataset,
        budget_minutes=budget_minutes,
        keep_all=keep_all,
        promote=promote,
        force=force,
    )
    if not as_json:
        out.print(results_table(result))
        out.print(
            f"{len(result.candidates)} of {result.planned} candidates in {result.seconds:.0f} s "
            f"({result.stopped}); base+RAG {100 * result.base_rag:.1f}%; "
            f"best [bold]{result.best}[/]"
        )
    if result.decision is not None and result.best is not None:
        # With --json, stdout carries the JSON only: the decision goes to stderr.
        _apply_decision(settings, result.best, result.decision, console if as_json else out)
    if as_json:
        out.print_json(json.dumps(result.as_dict(), default=str))
        return
    out.print(f"report: {result.folder}/report.md")


adapters_app = typer.Typer(help="The adapter registry.", no_args_is_help=True)
app.add_typer(adapters_app, name="adapters")


def _registry(ctx: typer.Context):  # type: ignore[no-untyped-def]
    from raft.registry_store import open_registry

    return open_registry(ctx.obj)


@adapters_app.command("list")
def adapters_list(ctx: typer.Context) -> None:
    """Adapters in the workspace; the promoted one is marked."""
    table = Table(title="Adapters")
    for col in ("", "name", "base", "dataset", "created", "val loss", "eval"):
        table.add_column(col)
    for info in _registry(ctx).list():
        meta = info.metadata
        evaluation = meta.get("eval") or {}
        table.add_row(
            "★" if info.promoted else "",
            info.name,
            info.base_model,
            str(meta.get("dataset")),
            str(meta.get("created")),
            str((meta.get("result") or {}).get("best_eval_loss")),
            json.dumps(evaluation)[:40] if evaluation else "",
        )
    out.print(table)


@adapters_app.command("show")
def adapters_show(ctx: typer.Context, name: Annotated[str, typer.Argument()]) -> None:
    """An adapter's metadata."""
    try:
        info = _registry(ctx).get(name)
    except DocentError as exc:
        _fail(str(exc))
    out.print_json(json.dumps({**info.metadata, "promoted": info.promoted, "path": str(info.path)}))


@adapters_app.command("promote")
def adapters_promote(ctx: typer.Context, name: Annotated[str, typer.Argument()]) -> None:
    """Make an adapter the one serving uses by default. An operator's explicit choice: not
    gated by validation accuracy (`train --promote` and `tune` are)."""
    _promote(ctx.obj, name)
    out.print(f"promoted [bold]{name}[/]")


def _promote(settings: DocentSettings, name: str) -> None:
    """Promote, and write the merged weights now where the serving engine runs adapters
    merged (vLLM on a CPU), so serving never waits for them."""
    from raft.merge import merge_if_served_merged
    from raft.registry_store import open_registry

    try:
        info = open_registry(settings).promote(name, settings.generator)
        with console.status("merging the adapter into the base weights for vLLM…"):
            merged = merge_if_served_merged(info, settings)
    except DocentError as exc:
        _fail(str(exc))
        raise  # unreachable
    if merged:
        out.print(f"[dim]merged weights for vLLM on this CPU: {merged}[/]", soft_wrap=True)


def _gated_promote(settings: DocentSettings, name: str, dataset: str, force: bool) -> bool:
    """Promote ``name`` only if its validation accuracy (on ``dataset``'s validation split)
    beats the promoted adapter and base+RAG by the margin, or with ``force``; say why."""
    from eval.promotion import judge_candidate
    from eval.validation import prepare_validation

    try:
        with _progress() as progress:
            vset = prepare_validation(settings, dataset)
            decision = judge_candidate(
                settings, name, vset, force=force, progress=_RichProgress(progress)
            )
    except DocentError as exc:
        # The adapter is kept either way; what is live stays live. Not an error: the training
        # asked for worked, only the judgement could not be made.
        out.print(
            f"[yellow]{name} is trained but not promoted: the gate could not score it on "
            f"validation: {exc}[/]",
            soft_wrap=True,
        )
        return False
    return _apply_decision(settings, name, decision)


def _apply_decision(
    settings: DocentSettings, name: str, decision: Any, echo: Console = out
) -> bool:
    """Say what the promotion gate decided, and promote when it says so."""
    if not decision.promote:
        echo.print(f"[yellow]not promoted[/] {name}: {decision.reason}", soft_wrap=True)
        return False
    _promote(settings, name)
    label = "promoted despite the gate" if decision.forced else "promoted"
    echo.print(f"[bold]{label}[/] {name}: {decision.reason}", soft_wrap=True)
    return True


@adapters_app.command("rollback")
def adapters_rollback(ctx: typer.Context) -> None:
    """Return to the adapter promoted before the current one."""
    try:
        info = _registry(ctx).rollback()
    except DocentError as exc:
        _fail(str(exc))
    out.print(
        f"promoted [bold]{info.name}[/]" if info else "no adapter promoted: the base model serves"
    )


loop_app = typer.Typer(
    help="The improvement loop: refresh → RAFT set → train → DPO → evaluate → gated promotion.",
    no_args_is_help=True,
)
app.add_typer(loop_app, name="loop")


@loop_app.command("run")
def loop_run(
    ctx: typer.Context,
    paths: Annotated[
        list[Path] | None, typer.Argument(help="Files or folders to refresh (none: as indexed).")
    ] = None,
    collection: Annotated[str, typer.Option(help="Collection of the documents.")] = "default",
    qa_file: Annotated[
        Path | None, typer.Option(help="Human questions for the first RAFT set.")
    ] = None,
    feedback: Annotated[
        bool, typer.Option(help="Learn from the API's ratings and corrections.")
    ] = True,
    dpo: Annotated[
        bool | None, typer.Option(help="Preference tuning after SFT [default: DOCENT_LOOP_DPO].")
    ] = None,
    force: Annotated[
        bool, typer.Option(help="Promote the best candidate even when the gate says no.")
    ] = False,
    even_if_unchanged: Annotated[
        bool, typer.Option(help="Train even when no document or feedback changed.")
    ] = False,
    lr: Annotated[float | None, typer.Option(help="Training learning rate.")] = None,
    epochs: Annotated[float | None, typer.Option(help="Training epochs.")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Stop training after N steps.")] = None,
    engine: Annotated[str | None, typer.Option(help="auto, vllm, hf or openai.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the round as JSON.")] = False,
) -> None:
    """One round of the loop. Re-running the same command after a crash resumes the round
    where it stopped; one round runs at a time per workspace."""
    from docent.loop import LoopRequest, run_loop

    settings = _settings(ctx, engine=engine)
    train = {
        k: v for k, v in (("lr", lr), ("epochs", epochs), ("max_steps", max_steps)) if v is not None
    }
    try:
        request = LoopRequest(
            paths=[str(p) for p in paths or []],
            collection=collection,
            qa_file=str(qa_file.resolve()) if qa_file else None,
            feedback=feedback,
            dpo=dpo,
            force=force,
            even_if_unchanged=even_if_unchanged,
            train=train,
        )
    except DocentError as exc:
        _fail(str(exc))
        raise  # unreachable
    record = _run_stage(run_loop, settings, request)
    if as_json:
        out.print_json(json.dumps(record.as_dict(), default=str))
        return
    _print_rounds([record])
    out.print(
        f"[dim]round record: {settings.workspace / 'loop' / record.id / 'round.json'}[/]",
        soft_wrap=True,
    )


@loop_app.command("history")
def loop_history(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print the rounds as JSON.")] = False,
) -> None:
    """Each round: index version → RAFT set (hash) → adapters → scores → promoted or why not."""
    from docent.loop import loop_store

    rounds = loop_store(ctx.obj).rounds()
    if as_json:
        out.print_json(json.dumps({"rounds": [r.as_dict() for r in rounds]}, default=str))
        return
    if not rounds:
        out.print("no loop round yet: `docent loop run PATH`")
        return
    _print_rounds(rounds)


@loop_app.command("show")
def loop_show(ctx: typer.Context, round_id: Annotated[str, typer.Argument()]) -> None:
    """One round's whole record (stages, lineage, scores, decision) as JSON."""
    from docent.loop import loop_store

    try:
        record = loop_store(ctx.obj).get(round_id)
    except DocentError as exc:
        _fail(str(exc))
        raise  # unreachable
    out.print_json(json.dumps(record.as_dict(), default=str))


def _print_rounds(rounds: list[Any]) -> None:
    """Each round as a short block: lineage, scores, and the gate's decision with its reason
    (a table of this many figures folds unreadably in an 80-column terminal)."""

    def pct(value: Any) -> str:
        return f"{100 * value:.1f}%" if isinstance(value, int | float) else "–"

    for r in rounds:
        lin, sc, decision = r.lineage, r.scores, r.decision
        minutes = sum(s.seconds for s in r.stages.values()) / 60
        chain = [f"index {lin.get('index_version') or '–'}"]
        if lin.get("raft_set"):
            chain.append(f"RAFT set {lin['raft_set']} ({str(lin.get('dataset_hash'))[:8]})")
        adapters = [a for a in (lin.get("sft"), lin.get("dpo")) if a]
        if adapters:
            chain.append(", ".join(adapters))
        out.print(
            f"[bold]{r.id}[/] {r.state} · {minutes:.1f} min · " + " → ".join(chain), soft_wrap=True
        )
        sft, dpo = sc.get("sft") or {}, sc.get("dpo") or {}
        if sft:
            live = sc.get("live") or {}
            out.print(
                f"  validation ({sc.get('validation_questions')} q.): base+RAG "
                f"{pct((sc.get('base+rag') or {}).get('accuracy'))} · "
                f"SFT {pct(sft.get('accuracy'))} · DPO {pct(dpo.get('accuracy'))} · "
                f"live {live.get('name') or '–'} "
                f"{pct(live.get('accuracy'))}; probe base {pct(sc.get('probe_base'))} · SFT "
                f"{pct(sft.get('probe'))} · DPO {pct(dpo.get('probe'))}",
                soft_wrap=True,
            )
        if decision:
            verdict = (
                (
                    "[bold]promoted despite the gate[/] "
                    if decision.get("forced")
                    else "[bold]promoted[/] "
                )
                + str(decision.get("adapter"))
                if decision.get("promote")
                else "[yellow]not promoted[/]"
            )
            out.print(f"  {verdict}: {decision.get('reason')}", soft_wrap=True)
        elif r.error:
            out.print(f"  [red]{r.error}[/]", soft_wrap=True)
        else:
            note = next((s.note for s in r.stages.values() if s.note), None)
            if note:
                out.print(f"  [dim]{note}[/]", soft_wrap=True)


@app.command()
def models(
    ctx: typer.Context,
    prepare: Annotated[bool, typer.Option(help="Convert the embedded generator now.")] = False,
) -> None:
    """Show where the embedder and generator come from (and prepare them offline)."""
    from docent import models as registry

    settings = ctx.obj
    try:
        rows = [("embedder", settings.embedder, registry.embedder_path(settings.embedder))]
        gen = (
            registry.generator_path(settings.generator, settings.cache_dir)
            if prepare
            else "(run with --prepare to convert/cache)"
        )
        rows.append(("generator", settings.generator, gen))
    except DocentError as exc:
        _fail(str(exc))
    for role, setting, path in rows:
        out.print(f"[bold]{role}[/] ({setting}): {path}", soft_wrap=True)


@app.command("eval")
def evaluate(
    ctx: typer.Context,
    qa: Annotated[
        Path | None,
        typer.Option(help="Questions JSONL (default: the --qa-file of the latest RAFT set)."),
    ] = None,
    systems: Annotated[str, typer.Option(help="Comma-separated.")] = "base,base+rag,raft,raft+rag",
    adapter: Annotated[
        str | None, typer.Option(help="promoted (default), latest (the newest) or a name.")
    ] = None,
    k: Annotated[int | None, typer.Option("-k", "--k", help="Chunks per question.")] = None,
    split: Annotated[str, typer.Option(help="Answerable questions of this split; 'all'.")] = "test",
    limit: Annotated[
        int | None, typer.Option(help="First N answerable questions (and N/4 unanswerable).")
    ] = None,
    distractors_sweep: Annotated[
        bool, typer.Option("--distractors-sweep", help="Accuracy vs distractor count.")
    ] = False,
    forgetting: Annotated[bool, typer.Option(help="General-knowledge probe.")] = True,
    max_tokens: Annotated[int, typer.Option(help="Tokens per answer.")] = 160,
    engine: Annotated[str | None, typer.Option(help="auto, vllm, hf or openai.")] = None,
    fresh: Annotated[
        bool, typer.Option(help="Ask the model again instead of reusing answers kept earlier.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Base vs base+RAG vs RAFT vs RAFT+RAG on the same questions; a report with plots.
    Each finished answer is kept, so a re-run after a crash resumes where it stopped."""
    from docent.workspace import Workspace
    from eval.report import headline, table, where, write_report
    from eval.runner import run_eval
    from raft.adapters import AdapterRegistry
    from raft.build import latest_manifest

    settings = _settings(ctx, engine=engine)
    workspace = Workspace(settings.workspace)
    if qa is None:
        latest = latest_manifest(workspace.raft_dir) or {}
        if not latest.get("qa_file"):
            _fail("no questions: pass --qa FILE (JSONL with question, answer, source, split)")
        qa = Path(latest["qa_file"])
    result = _run_stage(
        run_eval,
        settings,
        qa,
        systems=[s.strip() for s in systems.split(",") if s.strip()],
        adapter=adapter,
        k=k,
        split=None if split == "all" else split,
        limit=limit,
        sweep=distractors_sweep,
        forgetting=forgetting,
        max_tokens=max_tokens,
        fresh=fresh,
    )
    folder = write_report(result, workspace.reports_dir)
    if result.adapter:
        AdapterRegistry(workspace.adapters_dir).update_metadata(
            result.adapter,
            eval={"report": str(folder), "systems": result.systems, "retrieval": result.retrieval},
        )
    if as_json:
        out.print_json(json.dumps({"report": str(folder), **result.as_dict(), "predictions": []}))
        return
    out.print(table(result))
    for line in headline(result):
        out.print(f"[bold]{line}[/]")
    out.print(f"[dim]{where(result)}[/]", soft_wrap=True)
    out.print(f"report: {folder / 'report.html'}")


@app.command()
def ask(
    ctx: typer.Context,
    question: Annotated[str, typer.Argument(help="The question.")],
    k: Annotated[int | None, typer.Option("-k", help="Chunks to retrieve.")] = None,
    source: Annotated[list[str] | None, typer.Option(help="Only these source files.")] = None,
    collection: Annotated[list[str] | None, typer.Option(help="Only these collections.")] = None,
    adapter: Annotated[
        str | None, typer.Option(help="promoted (default), base or an adapter name.")
    ] = None,
    engine: Annotated[str | None, typer.Option(help="auto, vllm, hf or openai.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the answer as JSON.")] = False,
) -> None:
    """Answer one question from the knowledge base (what the API does, without a server)."""
    from retrieval import Filters
    from serving.oneshot import ask_once

    settings = _settings(ctx, engine=engine)
    try:
        with console.status("retrieving and generating…"):
            answer = ask_once(
                settings,
                question,
                k=k,
                filters=Filters.of(source, None, collection),
                adapter=adapter,
            )
    except DocentError as exc:
        _fail(str(exc))
    if as_json:
        out.print_json(
            json.dumps(
                {
                    "answer": answer.answer,
                    "reasoning": answer.reasoning,
                    "declined": answer.declined,
                    "grounded": answer.grounded,
                    "citations": [c.as_dict() for c in answer.citations],
                    "sources": [h.source for h in answer.hits],
                    "adapter": answer.adapter,
                    "timings": answer.timings,
                }
            )
        )
        return
    out.print(f"[bold]{answer.answer}[/]")
    for c in answer.citations:
        where = f"{c.source} § {c.section}" if c.section else c.source
        out.print(f"  [dim][{c.document}] {where}:[/] “{c.quote}”", soft_wrap=True)
    if not answer.citations:
        sources = ", ".join(dict.fromkeys(h.source for h in answer.hits)) or "none"
        out.print(f"  [dim]no quotes; retrieved from: {sources}[/]", soft_wrap=True)
    out.print(
        f"  [dim]{answer.model} + {answer.adapter or 'no adapter'}, "
        f"{answer.timings.get('total_ms', 0) / 1000:.1f} s[/]"
    )


@app.command()
def serve(
    ctx: typer.Context,
    host: Annotated[str | None, typer.Option(help="Address to listen on.")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on.")] = None,
    engine: Annotated[str | None, typer.Option(help="auto, vllm, hf or openai.")] = None,
    llm_url: Annotated[
        list[str] | None,
        typer.Option(
            help="An OpenAI-compatible server to generate with. Replicas of one model: repeat "
            "the option or separate URLs by commas; requests go to the least busy one."
        ),
    ] = None,
    llm_model: Annotated[str | None, typer.Option(help="Model name at --llm-url.")] = None,
    adapter: Annotated[
        str | None, typer.Option(help="Default adapter: promoted, base or a name.")
    ] = None,
) -> None:
    """Serve the retrieval-augmented API and the web chat page (uvicorn)."""
    from serving.server import serve as run_server

    settings = _settings(
        ctx,
        host=host,
        port=port,
        engine=engine,
        llm_url=llm_url or None,  # none given: DOCENT_LLM_URL stands
        llm_model=llm_model,
        serve_adapter=adapter,
    )
    # A server logs what it loads and serves (the CLI's default is warnings only).
    for name in ("docent", "serving"):
        logging.getLogger(name).setLevel(logging.INFO)
    logging.getLogger().setLevel(min(logging.getLogger().level, logging.INFO))
    try:
        run_server(settings)
    except DocentError as exc:
        _fail(str(exc))


if __name__ == "__main__":
    app()
