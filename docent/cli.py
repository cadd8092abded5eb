"""The ``docent`` command line. Builds one ``DocentSettings`` and hands it to each stage."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from docent.errors import DocentError
from docent.settings import DocentSettings

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


@app.callback()
def main(
    ctx: typer.Context,
    workspace: WorkspaceOpt = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    # Offline by design: nothing may be fetched from a model hub at run time.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not verbose:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    for noisy in ("bm25s", "sentence_transformers", "transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose else logging.WARNING)
    try:
        ctx.obj = DocentSettings().with_overrides(workspace=workspace)
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

    LABELS = {"read": "Reading & chunking", "embed": "Embedding", "index": "Indexing"}

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tasks: dict[str, Any] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(self.LABELS.get(stage, stage), total=total)
        self.progress.update(self.tasks[stage], completed=done, total=max(total, 1))


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
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Read, chunk and embed documents; re-running only re-embeds what changed."""
    from ingest.pipeline import refresh_index

    settings = _settings(
        ctx,
        chunk_size=chunk_size,
        chunk_overlap=chunk_overlap,
        index_type=index_type,
        embed_batch_size=batch_size,
    )
    try:
        with _progress() as progress:
            report = refresh_index(
                paths,
                settings,
                collection=collection,
                rebuild=rebuild,
                progress=_RichProgress(progress),
            )
    except DocentError as exc:
        _fail(str(exc))
    if as_json:
        out.print_json(json.dumps(report.as_dict()))
        return
    table = Table(title=f"Ingest → {settings.workspace / 'index'} ({report.version})")
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
    source: Annotated[list[str] | None, typer.Option(help="Only these sources.")] = None,
    section: Annotated[str | None, typer.Option(help="Section contains this text.")] = None,
    collection: Annotated[list[str] | None, typer.Option(help="Only these collections.")] = None,
    rerank: Annotated[bool | None, typer.Option(help="Use the configured reranker.")] = None,
    reranker: Annotated[str | None, typer.Option(help="Cross-encoder model.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Find the chunks that matter for a question."""
    from retrieval import Filters, Retriever

    settings = _settings(ctx, top_k=k, search_mode=mode, reranker=reranker)
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


if __name__ == "__main__":
    app()
