"""Ingest throughput and incremental-refresh cost of ``ingest.pipeline.refresh_index``.

What it measures (all in one process, one embedding model loaded once and shared):

1. **Full ingest** of a synthetic corpus: the documents of ``examples/handbook`` (md, html,
   pdf, docx; ``*.jsonl`` such as ``qa.jsonl`` and anything in ``.docentignore`` excluded)
   are read once with ``ingest.readers.read_file`` and written back as Markdown, ``--copies``
   times, into ``copy-NN/`` folders. A ``[copy N]`` marker goes into every paragraph (and
   every ~60 words of long ones) and every heading, so that no chunk text repeats across
   copies; otherwise the docstore's vector cache (vectors are reused by text hash) would hide
   embedding work.
   ``refresh_index(paths, DocentSettings(workspace=tmp), embedder=...)`` is timed end to end
   (model load excluded) and split into stages via its progress callback.
2. **Ceiling**: plain ``SentenceTransformer.encode(texts, batch_size=32,
   normalize_embeddings=True)`` of exactly the chunk texts the pipeline embedded (rebuilt from
   the docstore as ``Chunk.embed_text``). ``ours / ceiling`` is the end-to-end ingest rate as
   a fraction of the bare encode rate. Full ingests (each into a fresh workspace) and ceiling
   runs alternate ABBA-style ``--repeats`` times (2) and the fastest of each is compared, so
   that a busy spell of a shared machine does not land on one side only; "cores busy" (process
   CPU time / wall time) shows whether other processes took the CPU. For attribution, on the
   first ``--attribution-texts`` texts it compares one encode call with the way the pipeline
   calls the embedder (``Embedder.encode`` once per 32-text slice, so sentence-transformers can
   only length-sort within each slice).
3. **Refresh**: ``--touch-fraction`` of the files (at least one) get one paragraph edited, then
   ``refresh_index`` runs again; reported as a fraction of the full ingest time (goal < 5%),
   with the number of chunks actually re-embedded. Then a no-change re-run is timed.

Run (from the repository root)::

    HF_HUB_OFFLINE=1 .venv/bin/python bench/ingest.py                # ~3-4 min on 2 idle cores
    HF_HUB_OFFLINE=1 .venv/bin/python bench/ingest.py --copies 16    # bigger corpus
    HF_HUB_OFFLINE=1 .venv/bin/python bench/ingest.py --repeats 1 --attribution-texts 0  # quick

Prints a Markdown table; the same figures go to ``bench/out/ingest.json``. Timings are
printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT_DIR = HERE / "out"

# ``python bench/ingest.py`` puts bench/ first on sys.path, where this very file would shadow
# the ``ingest`` package: put the repository root there instead.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(ROOT))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from docent.hardware import describe, summary  # noqa: E402

MARK_EVERY_WORDS = 60  # < chunk_size (192 tokens ~ 140 words): every chunk holds a marker
LIST_ITEM = re.compile(r"^\s*(?:[-*+]|\d+[.)])\s+")
EDIT_SENTENCE = "This paragraph was edited for the refresh benchmark, revision {n}."


# --------------------------------------------------------------------------- corpus


def _mark_paragraph(par: str, copy: int) -> str:
    """``par`` with a copy marker in front and after every ~MARK_EVERY_WORDS words."""
    marker = f"[copy {copy}]"
    words = par.split(" ")
    out: list[str] = [marker]
    count = 0
    for word in words:
        out.append(word)
        count += 1
        sentence_end = word.endswith((".", ",", ";", ":"))
        if (count >= MARK_EVERY_WORDS and sentence_end) or count >= 2 * MARK_EVERY_WORDS:
            out.append(marker)
            count = 0
    return " ".join(out)


def _mark_item(line: str, copy: int) -> str:
    match = LIST_ITEM.match(line)
    if not match:
        return _mark_paragraph(line, copy) if line.strip() else line
    return match.group(0) + _mark_paragraph(line[match.end() :], copy)


def _is_structural(par: str) -> bool:
    first = par.lstrip()
    return first.startswith(("#", "```", "|", "---")) or not first


def _to_markdown(docs: list[Any], fallback_title: str) -> str:
    """Reader output as one Markdown text with a ``# title`` heading (PDF pages joined)."""
    title = str(docs[0].metadata.get("title") or fallback_title)
    parts: list[str] = []
    text_has_title = any(line.startswith("# ") for d in docs for line in d.text.splitlines())
    if not text_has_title:
        parts.append(f"# {title}")
    parts.extend(doc.text.strip() for doc in docs)
    return "\n\n".join(parts) + "\n"


def _paragraphs(text: str) -> list[str]:
    return re.split(r"\n\s*\n", text)


def _copy_text(text: str, copy: int) -> str:
    pars = _paragraphs(text)
    out = []
    for par in pars:
        if par.lstrip().startswith("#"):
            # Headings too: the chunker makes a heading directly followed by a sub-heading a
            # chunk of its own, which would otherwise be identical in every copy.
            out.append(
                "\n".join(
                    f"{ln} (copy {copy})" if ln.startswith("#") else ln for ln in par.split("\n")
                )
            )
            continue
        if _is_structural(par):  # tables, code
            out.append(par)
            continue
        lines = par.split("\n")
        if len(lines) > 1 and any(LIST_ITEM.match(ln) for ln in lines):
            # a list: mark every item, keeping its bullet first
            out.append("\n".join(_mark_item(ln, copy) for ln in lines))
        else:
            out.append(_mark_paragraph(par, copy))
    return "\n\n".join(out)


def build_corpus(source: Path, dest: Path, copies: int) -> dict[str, Any]:
    """Write ``copies`` marked Markdown copies of the readable documents under ``source``."""
    from ingest.pipeline import iter_sources
    from ingest.readers import UnreadableFileError, read_file

    files = [p for _, p in iter_sources([source]) if p.suffix.lower() != ".jsonl"]
    texts: dict[str, str] = {}
    formats: dict[str, int] = {}
    skipped: list[str] = []
    for path in files:
        try:
            docs = read_file(path)
        except UnreadableFileError as exc:
            skipped.append(f"{path.name}: {exc}")
            continue
        texts[path.stem] = _to_markdown(docs, path.stem)
        suffix = path.suffix.lower()[1:]
        formats[suffix] = formats.get(suffix, 0) + 1
    for copy in range(1, copies + 1):
        folder = dest / f"copy-{copy:02d}"
        folder.mkdir(parents=True)
        for stem, text in texts.items():
            (folder / f"{stem}.md").write_text(_copy_text(text, copy), encoding="utf-8")
    words = sum(len(t.split()) for t in texts.values())
    return {
        "source_files": len(texts),
        "formats": formats,
        "skipped": skipped,
        "files": len(texts) * copies,
        "words_per_copy": words,
    }


def edit_files(root: Path, fraction: float, revision: int, rng: random.Random) -> list[Path]:
    """Append a sentence to one mid-document paragraph of ``fraction`` of the files."""
    files = sorted(root.rglob("*.md"))
    n = max(1, math.ceil(fraction * len(files)))
    chosen = rng.sample(files, n)
    for path in chosen:
        pars = _paragraphs(path.read_text(encoding="utf-8"))
        body = [i for i, p in enumerate(pars) if not _is_structural(p)]
        target = body[len(body) // 2]
        pars[target] = pars[target].rstrip() + " " + EDIT_SENTENCE.format(n=revision)
        path.write_text("\n\n".join(pars), encoding="utf-8")
    return chosen


# --------------------------------------------------------------------------- timing helpers


class StageClock:
    """Progress callback for ``refresh_index``: drives a rich bar and timestamps stages."""

    def __init__(self, progress: Any) -> None:
        self.progress = progress
        self.tasks: dict[str, Any] = {}
        self.first: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self.start = time.perf_counter()

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = time.perf_counter()
        self.first.setdefault(stage, now)
        self.last[stage] = now
        if self.progress is None:
            return
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(stage, total=max(total, 1))
        self.progress.update(self.tasks[stage], completed=done, total=max(total, 1))

    def stages(self, end: float) -> dict[str, float]:
        """Seconds per stage, from the callback timestamps (see the module docstring)."""
        t0 = self.start
        embed0 = self.first.get("embed", None)
        embed1 = self.last.get("embed", embed0)
        index0 = self.first.get("index", None)
        index1 = self.last.get("index", index0)
        out: dict[str, float] = {}
        if embed0 is None:  # nothing changed: no embed / index stages
            out["read+fingerprint"] = end - t0
            return out
        out["read+chunk"] = embed0 - t0
        out["embed"] = (embed1 or embed0) - embed0
        if index0 is not None:
            out["db write+faiss"] = index0 - (embed1 or embed0)
            out["faiss write+bm25"] = (index1 or index0) - index0
            out["manifest+publish"] = end - (index1 or index0)
        return out


def _progress() -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description:>8}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        transient=True,
    )


class Timer:
    """Wall and process-CPU seconds of a block; ``cores`` = CPU / wall (about the thread count
    when nothing else competes for the cores, lower when other processes take them)."""

    def __enter__(self) -> Timer:
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._wall
        self.cpu = time.process_time() - self._cpu

    @property
    def cores(self) -> float:
        return self.cpu / self.wall if self.wall else 0.0


def timed_refresh(
    paths: list[Path], settings: Any, embedder: Any, label: str
) -> tuple[Any, Timer, dict[str, float]]:
    from ingest.pipeline import refresh_index

    with _progress() as bar:
        bar.console.log(f"refresh: {label}")
        clock = StageClock(bar)
        with Timer() as timer:
            clock.start = time.perf_counter()
            report = refresh_index(paths, settings, embedder=embedder, progress=clock)
            end = time.perf_counter()
    return report, timer, clock.stages(end)


def _chunk_texts(index_dir: Path) -> tuple[list[str], int, Any]:
    """Embedding inputs of all stored chunks (vector-id order), mismatching hashes, vectors."""
    import hashlib

    from ingest.chunking import Chunk
    from ingest.store import KnowledgeStore

    store = KnowledgeStore.open(index_dir)
    try:
        texts, bad = [], 0
        for c in store.docstore.iter_chunks():
            text = Chunk(c.chunk_id, c.doc_id, c.idx, c.text, c.metadata).embed_text
            if hashlib.sha256(text.encode("utf-8")).hexdigest() != c.text_hash:
                bad += 1
            texts.append(text)
        _ids, vectors = store.docstore.all_vectors()
    finally:
        store.close()
    return texts, bad, vectors


def _encode_once(embedder: Any, texts: list[str], batch: int) -> tuple[Timer, Any]:
    """One plain ``SentenceTransformer.encode`` call over all ``texts``: the ceiling."""
    import numpy as np

    with Timer() as timer:
        vectors = embedder.model.encode(
            texts,
            batch_size=batch,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
    return timer, np.asarray(vectors, dtype=np.float32)


def _encode_sliced(embedder: Any, texts: list[str], batch: int) -> Timer:
    """``texts`` encoded the way the pipeline calls the embedder: one call per slice."""
    with Timer() as timer:
        for start in range(0, len(texts), batch):
            embedder.encode(texts[start : start + batch], batch_size=batch)
    return timer


def _table(rows: list[tuple[str, str, str]]) -> str:
    lines = ["| measure | value | note |", "|---|---:|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def _best(timers: list[Timer]) -> Timer:
    return min(timers, key=lambda t: t.wall)


def _all(timers: list[Timer]) -> str:
    return ", ".join(f"{t.wall:.1f}" for t in timers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--source",
        type=Path,
        default=ROOT / "examples" / "handbook",
        help="folder whose documents are replicated (default: the handbook)",
    )
    parser.add_argument("--copies", type=int, default=4, help="copies of the source (4)")
    parser.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="full ingests (each into a fresh workspace) and ceiling runs, alternated "
        "ABBA-style; the fastest of each is compared (2)",
    )
    parser.add_argument(
        "--touch-fraction",
        type=float,
        default=0.01,
        help="fraction of files edited before the refresh (0.01, at least 1)",
    )
    parser.add_argument("--batch-size", type=int, default=32, help="embed batch size (32)")
    parser.add_argument(
        "--attribution-texts",
        type=int,
        default=256,
        help="texts (in store order) on which one encode call is compared with "
        "the pipeline's per-slice calls, once per repeat; 0 skips it (256)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the temp corpus/workspace")
    parser.add_argument("--out", type=Path, default=OUT_DIR / "ingest.json")
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    from docent.settings import DocentSettings
    from ingest.embedder import Embedder

    rng = random.Random(args.seed)
    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="docent-bench-ingest-"))
    try:
        corpus = tmp / "corpus"
        info = build_corpus(args.source.resolve(), corpus, args.copies)
        print(
            f"corpus: {info['files']} Markdown files ({args.copies} copies of "
            f"{info['source_files']} documents {info['formats']}, "
            f"{info['words_per_copy']} words per copy) in {corpus}"
        )
        for s in info["skipped"]:
            print(f"  skipped while building the corpus: {s}")

        def settings_for(run: int) -> DocentSettings:
            return DocentSettings(
                workspace=tmp / f"workspace-{run}", embed_batch_size=args.batch_size
            )

        settings = settings_for(0)
        with Timer() as load:
            embedder = Embedder.from_settings(settings)
        embedder.encode(["warm-up sentence for the embedder"] * 8)  # first-call overhead
        print(
            f"embedder {embedder.model_id} loaded in {load.wall:.1f}s (excluded); torch threads "
            f"{torch.get_num_threads()}, chunk_size {settings.chunk_size}, "
            f"overlap {settings.chunk_overlap}, batch {settings.embed_batch_size}; "
            f"load average {load_before[0]:.2f}; {summary()}"
        )

        # 1 + 2. full ingests and the ceiling on the very same texts, alternated (ABBA) so
        # that a slow phase of the machine does not land on one side only
        fulls: list[tuple[Any, Timer, dict[str, float]]] = []
        ceilings: list[Timer] = []
        one_call: list[Timer] = []
        sliced: list[Timer] = []
        texts: list[str] = []
        distinct: list[str] = []
        bad_hashes, max_diff = 0, 0.0
        for run in range(max(1, args.repeats)):
            steps = ("ingest", "ceiling") if run % 2 == 0 else ("ceiling", "ingest")
            for step in steps:
                if step == "ingest":
                    settings = settings_for(run)
                    fulls.append(
                        timed_refresh([corpus], settings, embedder, f"full ingest #{run + 1}")
                    )
                    if not texts:
                        texts, bad_hashes, stored = _chunk_texts(settings.workspace / "index")
                        # the pipeline embeds each distinct text once
                        distinct = list(dict.fromkeys(texts))
                    continue
                print(f"ceiling #{run + 1}: one encode call over {len(distinct)} texts ...")
                timer, vectors = _encode_once(embedder, distinct, args.batch_size)
                ceilings.append(timer)
                if len(ceilings) == 1 and texts:
                    position = {t: i for i, t in enumerate(distinct)}
                    rows_of = np.asarray([position[t] for t in texts], dtype=np.int64)
                    max_diff = float(np.abs(vectors[rows_of] - stored).max())
            sample = distinct[: args.attribution_texts]
            if sample:
                print(f"attribution #{run + 1}: {len(sample)} texts, one call vs slices")
                if run % 2 == 0:
                    one_call.append(_encode_once(embedder, sample, args.batch_size)[0])
                    sliced.append(_encode_sliced(embedder, sample, args.batch_size))
                else:
                    sliced.append(_encode_sliced(embedder, sample, args.batch_size))
                    one_call.append(_encode_once(embedder, sample, args.batch_size)[0])

        # 3. refresh after editing ~1% of the files, then a no-change run (last workspace)
        edited = edit_files(corpus, args.touch_fraction, 1, rng)
        refresh, refresh_t, refresh_stages = timed_refresh(
            [corpus], settings, embedder, f"after editing {len(edited)} file(s)"
        )
        noop, noop_t, noop_stages = timed_refresh([corpus], settings, embedder, "no change")
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    def stages_note(stages: dict[str, float]) -> str:
        return ", ".join(f"{k} {v:.2f}s" for k, v in stages.items())

    full, full_t, full_stages = min(fulls, key=lambda f: f[1].wall)
    full_s = full_t.wall
    n_chunks = full.total_chunks
    ours_rate = n_chunks / full_s
    embed_stage = full_stages.get("embed", float("nan"))
    embed_rate = full.embedded / embed_stage
    ceiling = _best(ceilings)
    ceiling_rate = len(distinct) / ceiling.wall
    attribution: dict[str, Any] = {}
    if one_call:
        attribution = {
            "texts": min(len(distinct), args.attribution_texts),
            "one_call_s": [t.wall for t in one_call],
            "sliced_s": [t.wall for t in sliced],
        }
        attribution["ratio"] = _best(one_call).wall / _best(sliced).wall
    runs = len(fulls)

    rows = [
        (
            "corpus",
            f"{info['files']} files / {n_chunks} chunks",
            f"{args.copies} copies x {info['source_files']} docs; {full.embedded} embedded, "
            f"{len(distinct)} distinct texts",
        ),
        (
            "full ingest",
            f"{full_s:.2f} s",
            f"best of {runs} ({_all([f[1] for f in fulls])} s); {full_t.cores:.2f} cores busy; "
            f"{stages_note(full_stages)}",
        ),
        ("ours: ingest rate", f"{ours_rate:.1f} chunks/s", "refresh_index end to end"),
        ("ours: embed-stage rate", f"{embed_rate:.1f} chunks/s", "pipeline's embed stage only"),
        (
            "ceiling: plain encode",
            f"{ceiling_rate:.1f} chunks/s",
            f"SentenceTransformer.encode, batch {args.batch_size}, one call; best of "
            f"{len(ceilings)} ({_all(ceilings)} s); {ceiling.cores:.2f} cores busy",
        ),
        ("**ours / ceiling**", f"{ours_rate / ceiling_rate:.2f}", "end-to-end ingest vs encode"),
        (
            "embed stage / ceiling",
            f"{embed_rate / ceiling_rate:.2f}",
            "embedded texts/s in the embed stage vs ceiling",
        ),
        (
            "refresh (edit)",
            f"{refresh_t.wall:.2f} s",
            f"{len(edited)} file(s) edited; {refresh.embedded} chunk(s) embedded, "
            f"+{refresh.added} ~{refresh.updated} -{refresh.removed}; "
            f"{stages_note(refresh_stages)}",
        ),
        ("**refresh / full**", f"{100 * refresh_t.wall / full_s:.1f} %", "goal < 5 %"),
        (
            "no-change re-run",
            f"{noop_t.wall:.2f} s",
            f"{100 * noop_t.wall / full_s:.1f} % of full; published={noop.published}, "
            f"embedded={noop.embedded}",
        ),
        ("sanity: stored vs ceiling vectors", f"{max_diff:.1e}", "max abs difference"),
        ("sanity: hash mismatches", str(bad_hashes), "stored text_hash vs rebuilt embed_text"),
    ]
    if attribution:
        rows.insert(
            7,
            (
                f"attribution: {args.batch_size}-text slices / one call",
                f"{attribution['ratio']:.2f}",
                f"throughput on the first {attribution['texts']} texts, best of "
                f"{len(one_call)}: {attribution['texts'] / _best(sliced).wall:.1f} vs "
                f"{attribution['texts'] / _best(one_call).wall:.1f} texts/s "
                "(the pipeline calls encode once per slice)",
            ),
        )
    table = _table(rows)
    load_after = os.getloadavg()
    print()
    print(table)
    print(
        f"\n1-min load average {load_before[0]:.2f} before, {load_after[0]:.2f} after; "
        "'cores busy' under the torch thread count means other processes took CPU time"
    )

    result = {
        "bench": "ingest",
        "machine": {
            "python": platform.python_version(),
            **describe(),
            "torch_threads": torch.get_num_threads(),
        },
        "args": {k: str(v) for k, v in vars(args).items()},
        "corpus": info,
        "chunks": n_chunks,
        "distinct_texts": len(distinct),
        "full": {
            "seconds": full_s,
            "all_seconds": [f[1].wall for f in fulls],
            "cores_busy": full_t.cores,
            "stages": full_stages,
            "report": full.as_dict(),
        },
        "ceiling": {
            "seconds": ceiling.wall,
            "all_seconds": [t.wall for t in ceilings],
            "cores_busy": ceiling.cores,
        },
        "rates_chunks_per_s": {
            "ours": ours_rate,
            "ours_embed_stage": embed_rate,
            "ceiling": ceiling_rate,
        },
        "attribution": attribution,
        "ratios": {
            "ours_over_ceiling": ours_rate / ceiling_rate,
            "embed_stage_over_ceiling": embed_rate / ceiling_rate,
            "refresh_over_full": refresh_t.wall / full_s,
            "noop_over_full": noop_t.wall / full_s,
        },
        "refresh": {
            "seconds": refresh_t.wall,
            "edited_files": len(edited),
            "stages": refresh_stages,
            "report": refresh.as_dict(),
        },
        "noop": {"seconds": noop_t.wall, "stages": noop_stages, "report": noop.as_dict()},
        "load_average": {"before": load_before, "after": load_after},
        "sanity": {"max_vector_diff": max_diff, "hash_mismatches": bad_hashes},
        "table": table,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
