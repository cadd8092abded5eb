"""Search latency and recall of ``ingest.vector_index`` (FAISS) and ``ingest.lexical_index`` (BM25).

Dense part: synthetic, L2-normalised float32 vectors (``--dim`` 384, the MiniLM size) at each of
``--sizes`` (10k and 200k by default). ``--distribution clustered`` (default) draws points from
overlapping Gaussian clusters (~200 points each, spread 1.5 around unit-variance centres) in a
48-dimensional subspace plus a little full-dimensional noise, which is closer to real sentence
embeddings than i.i.d. noise; ``uniform`` is i.i.d. Gaussian (the hardest case for approximate
indexes). HNSW/IVF recall depends strongly on this choice: compare runs, not absolute values.
Ids are sparse int64 (like the docstore's AUTOINCREMENT ids after deletions). ``--queries``
queries are data vectors plus noise (cosine ~0.9 to their source), so neighbourhoods are
meaningful.

For each ``--kinds`` (flat, hnsw, ivf) the index is built with ``vector_index.build_index``
(build time reported) and queried one query at a time with ``vector_index.search(index, q, k)``:
p50/p99 latency and recall@k against exact search. The baseline, measured in the same run, is
a bare ``faiss.IndexFlatIP`` searched one query at a time (no id map, no selector); ratios are
baseline p50 / ours p50 (> 1: faster than exact brute force). ``--filter-kinds`` (flat by
default) are also searched with ``allowed_ids`` = a random ``--filter-fraction`` (10%) of the
ids, with recall against exact search restricted to those ids.

Lexical part: ``LexicalIndex.build`` over ``--bm25-docs`` synthetic documents (words drawn from
a Zipf distribution over ``--bm25-vocab`` made-up words, ``--bm25-doc-words`` per document),
then ``LexicalIndex.search(query, k)`` latency for 3-5-word queries taken from random
documents. Baseline: ``bm25s.BM25.retrieve`` on the same index with pre-tokenized queries (so
the ratio shows the wrapper's tokenizing/stemming/id-mapping overhead).

FAISS keeps its default OpenMP thread count (printed).

Run (from the repository root)::

    HF_HUB_OFFLINE=1 .venv/bin/python bench/search.py                       # ~4-5 min, 2 cores
    HF_HUB_OFFLINE=1 .venv/bin/python bench/search.py --sizes 10000 --kinds flat,ivf   # quick
    HF_HUB_OFFLINE=1 .venv/bin/python bench/search.py --sizes 1000000 --queries 500

Prints a Markdown table; the same figures go to ``bench/out/search.json``. Timings are printed,
never asserted.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT_DIR = HERE / "out"

# Run as ``python bench/search.py``: make the repository's packages importable first.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(ROOT))
os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402

from docent.hardware import describe, summary  # noqa: E402

KINDS = ("flat", "hnsw", "ivf")


# --------------------------------------------------------------------------- data


def _normalise(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True) + 1e-12
    return x


def make_vectors(
    n: int,
    dim: int,
    rng: np.random.Generator,
    distribution: str,
    intrinsic: int,
    per_cluster: int,
    spread: float,
) -> np.ndarray:
    """``n`` normalised float32 vectors (built in blocks to bound temporary memory)."""
    out = np.empty((n, dim), dtype=np.float32)
    if distribution == "uniform":
        for start in range(0, n, 50_000):
            stop = min(n, start + 50_000)
            out[start:stop] = rng.standard_normal((stop - start, dim), dtype=np.float32)
        return _normalise(out)
    n_centers = max(1, n // per_cluster)
    centers = rng.standard_normal((n_centers, intrinsic), dtype=np.float32)
    basis = np.linalg.qr(rng.standard_normal((dim, intrinsic)))[0].T.astype(np.float32)
    for start in range(0, n, 50_000):
        stop = min(n, start + 50_000)
        m = stop - start
        z = centers[rng.integers(0, n_centers, m)]
        z = z + spread * rng.standard_normal((m, intrinsic), dtype=np.float32)
        noise = 0.05 * rng.standard_normal((m, dim), dtype=np.float32)
        out[start:stop] = z @ basis + noise
    return _normalise(out)


def make_queries(data: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Data vectors plus noise of norm ~0.45 (cosine ~0.9 to their source), normalised."""
    rows = rng.choice(len(data), size=n, replace=False)
    noise = rng.standard_normal((n, data.shape[1]), dtype=np.float32)
    noise *= 0.45 / np.sqrt(data.shape[1])
    return _normalise(data[rows] + noise)


def make_ids(n: int, rng: np.random.Generator) -> np.ndarray:
    """Sparse, increasing int64 ids, like AUTOINCREMENT keys after deletions."""
    return np.sort(rng.choice(3 * n + 10, size=n, replace=False)).astype(np.int64)


# --------------------------------------------------------------------------- measuring


def _progress() -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description:>28}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        transient=True,
    )


def time_queries(
    fn: Any, queries: Any, label: str, warmup: int = 5
) -> tuple[list[float], list[Any]]:
    """Seconds per call of ``fn(query)`` and its results, one query at a time."""
    for q in queries[:warmup]:
        fn(q)
    times, results = [], []
    with _progress() as bar:
        task = bar.add_task(label, total=len(queries))
        for q in queries:
            t = time.perf_counter()
            res = fn(q)
            times.append(time.perf_counter() - t)
            results.append(res)
            bar.advance(task)
    return times, results


def latency(times: list[float]) -> dict[str, float]:
    ms = np.asarray(times) * 1000.0
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
        "qps": float(1000.0 / ms.mean()),
    }


def recall(found: list[np.ndarray], truth: np.ndarray, k: int) -> float:
    hits = [
        len(set(f[:k].tolist()) & set(t[:k].tolist())) for f, t in zip(found, truth, strict=True)
    ]
    return float(np.mean(hits) / k)


def _short(found: list[np.ndarray], k: int) -> int:
    """How many queries got fewer than ``k`` results."""
    return sum(1 for f in found if len(f) < k)


def exact_truth(
    vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int
) -> tuple[Any, np.ndarray]:
    """A bare IndexFlatIP over ``vectors`` and the ids of each query's exact top ``k``."""
    import faiss

    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(vectors)
    _scores, rows = flat.search(queries, k)
    return flat, ids[rows]


def bench_dense(
    size: int, args: argparse.Namespace, rng: np.random.Generator, console: Any
) -> list[dict[str, Any]]:
    from ingest import vector_index

    rows: list[dict[str, Any]] = []
    with console.status(f"generating {size:,} x {args.dim} vectors ({args.distribution})"):
        vectors = make_vectors(
            size,
            args.dim,
            rng,
            args.distribution,
            args.intrinsic_dim,
            args.cluster_size,
            args.cluster_spread,
        )
        ids = make_ids(size, rng)
        queries = make_queries(vectors, args.queries, rng)
        exact, truth = exact_truth(vectors, ids, queries, args.k)

    def bare(q: np.ndarray, exact: Any = exact) -> Any:
        return exact.search(q.reshape(1, -1), args.k)

    base_times, _ = time_queries(bare, queries, f"{size:,} exact baseline")
    base = latency(base_times)
    rows.append(
        {
            "size": size,
            "index": "baseline: bare IndexFlatIP",
            "build_s": None,
            **base,
            "recall": 1.0,
            "speedup_vs_exact": 1.0,
        }
    )
    console.log(f"{size:,} baseline: p50 {base['p50_ms']:.3f} ms")

    allowed = np.sort(
        rng.choice(ids, size=max(args.k, int(args.filter_fraction * size)), replace=False)
    )
    filtered_truth = None
    if args.filter_kinds:
        mask = np.isin(ids, allowed)
        sub, filtered_truth = exact_truth(vectors[mask], ids[mask], queries, args.k)
        del sub

    for kind in args.kinds:
        with console.status(f"building {kind} over {size:,} vectors"):
            t = time.perf_counter()
            index = vector_index.build_index(kind, vectors, ids, args.dim)
            build_s = time.perf_counter() - t
        console.log(f"{size:,} {kind}: built in {build_s:.1f}s")

        def ours(q: np.ndarray, index: Any = index) -> np.ndarray:
            return vector_index.search(index, q, args.k)[1]

        times, found = time_queries(ours, queries, f"{size:,} {kind}")
        lat = latency(times)
        rows.append(
            {
                "size": size,
                "index": kind,
                "build_s": build_s,
                **lat,
                "recall": recall(found, truth, args.k),
                "short_results": _short(found, args.k),
                "speedup_vs_exact": base["p50_ms"] / lat["p50_ms"],
            }
        )
        if kind in args.filter_kinds and filtered_truth is not None:

            def ours_filtered(q: np.ndarray, index: Any = index) -> np.ndarray:
                return vector_index.search(index, q, args.k, allowed)[1]

            pct = f"{100 * len(allowed) / size:g}%"
            times, found = time_queries(ours_filtered, queries, f"{size:,} {kind} filter {pct}")
            lat = latency(times)
            outside = sum(int(np.isin(f, allowed, invert=True).sum()) for f in found)
            rows.append(
                {
                    "size": size,
                    "index": f"{kind} + filter {pct}",
                    "build_s": None,
                    **lat,
                    "recall": recall(found, filtered_truth, args.k),
                    "speedup_vs_exact": base["p50_ms"] / lat["p50_ms"],
                    "short_results": _short(found, args.k),
                    "ids_outside_filter": outside,
                }
            )
        del index
        gc.collect()
    del vectors, exact, bare
    gc.collect()
    return rows


# --------------------------------------------------------------------------- BM25


def make_words(n: int, rng: np.random.Generator) -> list[str]:
    consonants = list("bdfgklmnprstvz")
    vowels = list("aeiou")
    words: set[str] = set()
    while len(words) < n:
        syllables = int(rng.integers(2, 5))
        words.add(
            "".join(str(rng.choice(consonants)) + str(rng.choice(vowels)) for _ in range(syllables))
        )
    return sorted(words)


def bench_bm25(
    n_docs: int, args: argparse.Namespace, rng: np.random.Generator, console: Any
) -> list[dict[str, Any]]:
    from ingest.lexical_index import LexicalIndex, tokenize_query

    vocab = np.asarray(make_words(args.bm25_vocab, rng))
    weights = 1.0 / np.arange(1, len(vocab) + 1) ** args.bm25_zipf
    weights /= weights.sum()
    draws = rng.choice(len(vocab), size=(n_docs, args.bm25_doc_words), p=weights)
    texts = [" ".join(vocab[row]) for row in draws]
    ids = make_ids(n_docs, rng)
    queries = []
    for _ in range(args.queries):
        row = draws[int(rng.integers(0, n_docs))]
        queries.append(
            " ".join(vocab[rng.choice(row, size=int(rng.integers(3, 6)), replace=False)])
        )

    with console.status(f"building BM25 over {n_docs:,} docs"):
        t = time.perf_counter()
        lex = LexicalIndex.build(texts, ids)
        build_s = time.perf_counter() - t
    console.log(
        f"BM25 {n_docs:,}: built in {build_s:.1f}s, vocabulary "
        f"{len(lex.bm25.vocab_dict):,} terms after stemming"
    )

    bm25 = lex.bm25
    pre = [tokenize_query(q, bm25.vocab_dict) for q in queries]

    def bare(tokens: list[list[str]]) -> np.ndarray:
        rows, _scores = bm25.retrieve(tokens, k=args.k, show_progress=False, n_threads=1)
        return ids[rows[0]]

    base_times, base_found = time_queries(bare, pre, f"BM25 {n_docs:,} bm25s baseline")
    base = latency(base_times)
    out = [
        {
            "size": n_docs,
            "index": "baseline: bm25s.retrieve (pre-tokenized)",
            "build_s": None,
            **base,
            "recall": 1.0,
            "speedup_vs_exact": 1.0,
        }
    ]

    times, found = time_queries(lambda q: lex.search(q, args.k)[1], queries, f"BM25 {n_docs:,}")
    lat = latency(times)
    out.append(
        {
            "size": n_docs,
            "index": "bm25 (LexicalIndex.search)",
            "build_s": build_s,
            **lat,
            "recall": recall(found, np.asarray(base_found), args.k),
            "short_results": _short(found, args.k),
            "speedup_vs_exact": base["p50_ms"] / lat["p50_ms"],
        }
    )

    allowed = np.sort(
        rng.choice(ids, size=max(args.k, int(args.filter_fraction * n_docs)), replace=False)
    )
    times, found = time_queries(
        lambda q: lex.search(q, args.k, allowed)[1], queries, f"BM25 {n_docs:,} filter"
    )
    lat = latency(times)
    outside = sum(int(np.isin(f, allowed, invert=True).sum()) for f in found)
    out.append(
        {
            "size": n_docs,
            "index": f"bm25 + filter {100 * args.filter_fraction:g}%",
            "build_s": None,
            **lat,
            "recall": None,
            "speedup_vs_exact": base["p50_ms"] / lat["p50_ms"],
            "short_results": _short(found, args.k),
            "ids_outside_filter": outside,
        }
    )
    return out


# --------------------------------------------------------------------------- main


def _fmt(value: Any, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def table(rows: list[dict[str, Any]], k: int) -> str:
    lines = [
        f"| n | index | build s | p50 ms | p99 ms | QPS | recall@{k} | < {k} hits "
        "| baseline p50 / p50 |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['size']:,} | {r['index']} | {_fmt(r['build_s'], '.2f')} | "
            f"{r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {r['qps']:,.0f} | "
            f"{_fmt(r['recall'], '.3f')} | {_fmt(r.get('short_results'), 'd')} | "
            f"{r['speedup_vs_exact']:.2f}x |"
        )
    return "\n".join(lines)


def _csv_ints(text: str) -> list[int]:
    return [int(x.replace("_", "")) for x in text.split(",") if x.strip()]


def _csv_kinds(text: str) -> list[str]:
    kinds = [x.strip() for x in text.split(",") if x.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown kind(s) {bad}: use {', '.join(KINDS)}")
    return kinds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes",
        type=_csv_ints,
        default=[10_000, 200_000],
        help="vector counts, comma-separated (10000,200000)",
    )
    parser.add_argument(
        "--kinds",
        type=_csv_kinds,
        default=list(KINDS),
        help="index kinds, comma-separated (flat,hnsw,ivf)",
    )
    parser.add_argument(
        "--filter-kinds",
        type=lambda s: _csv_kinds(s) if s else [],
        default=["flat"],
        help="kinds also searched with a filter (flat); '' none",
    )
    parser.add_argument("--filter-fraction", type=float, default=0.1)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--distribution", choices=("clustered", "uniform"), default="clustered")
    parser.add_argument(
        "--intrinsic-dim",
        type=int,
        default=48,
        help="dimension of the subspace the clusters live in (48)",
    )
    parser.add_argument(
        "--cluster-size", type=int, default=200, help="mean points per cluster (200)"
    )
    parser.add_argument(
        "--cluster-spread",
        type=float,
        default=1.5,
        help="within-cluster standard deviation; cluster centres have 1 (1.5)",
    )
    parser.add_argument(
        "--bm25-docs",
        type=_csv_ints,
        default=[10_000],
        help="BM25 corpus sizes, comma-separated; empty skips BM25 (10000)",
    )
    parser.add_argument("--bm25-vocab", type=int, default=5000)
    parser.add_argument("--bm25-doc-words", type=int, default=100)
    parser.add_argument(
        "--bm25-zipf",
        type=float,
        default=1.0,
        help="Zipf exponent of word frequencies; 0 = uniform (1.0)",
    )
    parser.add_argument(
        "--faiss-threads",
        type=int,
        default=None,
        help="faiss.omp_set_num_threads(N) first (default: FAISS's own default)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT_DIR / "search.json")
    args = parser.parse_args(argv)

    import faiss
    from rich.console import Console

    console = Console(stderr=True)
    rng = np.random.default_rng(args.seed)
    if args.faiss_threads:
        faiss.omp_set_num_threads(args.faiss_threads)
    threads = faiss.omp_get_max_threads()
    load_before = os.getloadavg()
    print(
        f"faiss {faiss.__version__}, OpenMP threads {threads} "
        f"({'--faiss-threads' if args.faiss_threads else 'FAISS default'}), "
        f"cpus {os.cpu_count()}; dim {args.dim}, {args.queries} queries, k={args.k}, "
        f"data {args.distribution}; load average {load_before[0]:.2f}; {summary()}"
    )

    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for size in args.sizes:
        rows += bench_dense(size, args, rng, console)
    for n_docs in args.bm25_docs:
        rows += bench_bm25(n_docs, args, rng, console)
    total_s = time.perf_counter() - started

    text = table(rows, args.k)
    print()
    print(text)
    load_after = os.getloadavg()
    print(
        f"\ntotal {total_s:.0f}s; 1-min load average {load_before[0]:.2f} before, "
        f"{load_after[0]:.2f} after (other processes on the machine skew timings)"
    )
    result = {
        "bench": "search",
        "machine": {
            "python": platform.python_version(),
            **describe(),
            "faiss": faiss.__version__,
            "faiss_omp_threads": threads,
        },
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "rows": rows,
        "total_s": total_s,
        "load_average": {"before": load_before, "after": load_after},
        "table": text,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
