"""Serving throughput and latency of ``POST /v1/ask``: the vLLM engine vs the transformers one.

Each engine is served by a real ``docent serve`` subprocess on loopback
(``docent --workspace WS serve --engine vllm|hf --host 127.0.0.1 --port P``), started one after
the other (never both at once: on 2 cores they would fight for the CPU), waited for with
``GET /readyz`` (the startup time is printed) and stopped with SIGINT (then SIGTERM, then
SIGKILL after timeouts; the exit is checked). The workspace is a temp folder with
``examples/handbook`` ingested once by ``docent ingest``; both servers answer from it.

For each ``--levels`` concurrency c, a bounded loop sends a fixed number of requests
(``max(2*c, 8)``; ``--quick``: ``max(2*c, 4)``; ``--requests N`` overrides) from c workers,
each with its own ``httpx.AsyncClient``, pulling questions from a shared queue. Questions are
the answerable ones of ``examples/handbook/qa.jsonl`` in file order, the same sequence for
both engines; each level takes the next ones, so no prompt repeats (vLLM caches prefixes).
Reported per engine and level: requests/s (completed / wall time), client-side p50/p99
latency (with few requests p99 is close to the max), generated tokens/s (sum of
``usage.completion_tokens`` / wall time) and the mean completion tokens. Decoding is greedy
(``/v1/ask`` uses temperature 0) and answers are capped at ``--max-tokens`` (64, through
``DOCENT_ANSWER_MAX_TOKENS``), so both engines do about the same work: compare the mean
completion tokens and the share of identical answers to check. The ratio printed is
vLLM / HF requests/s (and tokens/s) at each level, measured in the same run.

Two warm-up requests per server (the last two questions) are sent first and not counted.
``VLLM_CPU_KVCACHE_SPACE=2``; ``DOCENT_*`` variables from the calling shell are dropped so
the servers see the same settings.

Run (from the repository root)::

    HF_HUB_OFFLINE=1 .venv/bin/python bench/serve.py --quick     # ~4 min on 2 cores
    HF_HUB_OFFLINE=1 .venv/bin/python bench/serve.py             # levels 1,4,16, ~10 min
    HF_HUB_OFFLINE=1 .venv/bin/python bench/serve.py --engines hf --levels 1,4 --requests 8

Prints a Markdown table and writes ``bench/out/serve.json``. Timings are printed, never
asserted; other processes on the machine skew them (the load average is printed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT_DIR = HERE / "out"
QA_FILE = ROOT / "examples" / "handbook" / "qa.jsonl"
HANDBOOK = ROOT / "examples" / "handbook"

os.environ["HF_HUB_OFFLINE"] = "1"

import httpx  # noqa: E402
import numpy as np  # noqa: E402

from docent.hardware import auto_dtype, describe, summary  # noqa: E402

LABELS = {"vllm": "vLLM", "hf": "HF"}


# --------------------------------------------------------------------------- setup


def docent_exe() -> str:
    """The ``docent`` console script next to this Python (the venv's), else the repo's."""
    for candidate in (Path(sys.executable).parent / "docent", ROOT / ".venv" / "bin" / "docent"):
        if candidate.exists():
            return str(candidate)
    found = shutil.which("docent")
    if not found:
        raise SystemExit("no `docent` executable: install the project (pip install -e .)")
    return found


def server_env(max_tokens: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOCENT_")}
    env.update(
        HF_HUB_OFFLINE="1",
        VLLM_CPU_KVCACHE_SPACE="2",
        DOCENT_ANSWER_MAX_TOKENS=str(max_tokens),
        PYTHONUNBUFFERED="1",
    )
    return env


def load_questions() -> list[str]:
    rows = [json.loads(line) for line in QA_FILE.read_text().splitlines() if line.strip()]
    return [r["question"] for r in rows if r.get("answerable", True)]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in ("torch", "transformers", "vllm", "httpx", "uvicorn"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


# --------------------------------------------------------------------------- server process


class Server:
    """One ``docent serve`` subprocess in its own session (its vLLM workers join its group)."""

    def __init__(self, engine: str, workspace: Path, env: dict[str, str], log: Path) -> None:
        self.engine = engine
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [docent_exe(), "--workspace", str(workspace), "serve", "--engine", engine]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port)]
        self.started = time.perf_counter()
        self._log_file = log.open("wb")
        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.pgid = self.proc.pid  # session leader: its group id is its pid

    def wait_ready(self, timeout: float) -> tuple[float, dict[str, Any]]:
        """Seconds from spawn to the first 200 from /readyz, and its body."""
        deadline = self.started + timeout
        last = ""
        with httpx.Client(timeout=5.0) as client:
            while time.perf_counter() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"`docent serve --engine {self.engine}` exited with {self.proc.returncode} "
                        f"before it was ready; last lines of {self.log}:\n{tail(self.log)}"
                    )
                try:
                    r = client.get(f"{self.url}/readyz")
                    if r.status_code == 200:
                        return time.perf_counter() - self.started, r.json()
                    last = f"{r.status_code} {r.text[:200]}"
                except httpx.TransportError as exc:
                    last = type(exc).__name__
                time.sleep(0.5)
        raise RuntimeError(
            f"`docent serve --engine {self.engine}` not ready after {timeout:.0f}s (last /readyz: "
            f"{last}); last lines of {self.log}:\n{tail(self.log)}"
        )

    def rss_mib(self) -> float | None:
        """Resident memory of the server and its children (vLLM's engine core/workers)."""
        try:
            import psutil
        except ImportError:
            return None
        try:
            root = psutil.Process(self.proc.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return None
        total = 0
        for p in procs:
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        return total / 2**20

    def _group_alive(self) -> list[int]:
        """Pids still in the server's process group (orphaned workers included)."""
        try:
            import psutil
        except ImportError:
            try:
                os.killpg(self.pgid, 0)
                return [self.pgid]
            except (ProcessLookupError, PermissionError):
                return []
        alive = []
        for p in psutil.process_iter(["pid", "status"]):
            try:
                if os.getpgid(p.info["pid"]) == self.pgid and p.info["status"] != "zombie":
                    alive.append(p.info["pid"])
            except (ProcessLookupError, psutil.Error):
                pass
        return alive

    def stop(self, grace: float = 30.0) -> dict[str, Any]:
        """SIGINT (uvicorn's graceful shutdown), SIGTERM after ``grace`` s, SIGKILL after 10 s
        more; then the same for anything left in the process group, one pid at a time."""
        started = time.perf_counter()
        how = "already exited"
        if self.proc.poll() is None:
            how = "SIGINT"
            for sig, wait in (
                (signal.SIGINT, grace),
                (signal.SIGTERM, 10.0),
                (signal.SIGKILL, 10.0),
            ):
                how = sig.name
                try:
                    self.proc.send_signal(sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        leftovers: list[int] = []
        deadline = time.perf_counter() + 5.0
        while (leftovers := self._group_alive()) and time.perf_counter() < deadline:
            time.sleep(0.2)
        killed: list[int] = []
        for pid in leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
        self._log_file.close()
        return {
            "signal": how,
            "exit_code": self.proc.returncode,
            "stop_s": round(time.perf_counter() - started, 2),
            "leftover_pids_killed": killed,
        }


# --------------------------------------------------------------------------- load


async def ask(client: httpx.AsyncClient, question: str, k: int | None) -> dict[str, Any]:
    body: dict[str, Any] = {"question": question, "stream": False}
    if k is not None:
        body["k"] = k
    started = time.perf_counter()
    try:
        r = await client.post("/v1/ask", json=body)
    except httpx.HTTPError as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}", "question": question}
    seconds = time.perf_counter() - started
    if r.status_code != 200:
        return {
            "ok": False,
            "seconds": seconds,
            "error": f"{r.status_code} {r.text[:300]}",
            "question": question,
        }
    data = r.json()
    usage = data.get("usage") or {}
    return {
        "ok": True,
        "seconds": seconds,
        "question": question,
        "answer": data.get("answer"),
        "declined": data.get("declined"),
        "finish_reason": data.get("finish_reason"),
        "completion_tokens": int(usage.get("completion_tokens") or 0),
        "prompt_tokens": int(usage.get("prompt_tokens") or 0),
        "timings": data.get("timings") or {},
    }


async def run_level(
    url: str, questions: list[str], concurrency: int, k: int | None, timeout: float
) -> tuple[float, list[dict[str, Any]]]:
    """Send ``questions`` from ``concurrency`` workers; the wall time and one record each."""
    queue: asyncio.Queue[str] = asyncio.Queue()
    for q in questions:
        queue.put_nowait(q)
    results: list[dict[str, Any]] = []
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)

    async def worker() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
            while True:
                try:
                    q = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                results.append(await ask(client, q, k))

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started, results


def summarise(wall: float, results: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in results if r["ok"]]
    lat = np.asarray([r["seconds"] for r in ok]) * 1000.0
    tokens = sum(r["completion_tokens"] for r in ok)

    def mean_timing(key: str) -> float | None:
        vals = [r["timings"][key] for r in ok if key in r["timings"]]
        return round(float(np.mean(vals)), 1) if vals else None

    return {
        "requests": len(results),
        "ok": len(ok),
        "errors": [r["error"] for r in results if not r["ok"]][:5],
        "wall_s": round(wall, 3),
        "req_per_s": round(len(ok) / wall, 3) if wall else None,
        "p50_ms": round(float(np.percentile(lat, 50)), 1) if len(lat) else None,
        "p99_ms": round(float(np.percentile(lat, 99)), 1) if len(lat) else None,
        "max_ms": round(float(lat.max()), 1) if len(lat) else None,
        "completion_tokens": tokens,
        "tokens_per_s": round(tokens / wall, 2) if wall else None,
        "mean_completion_tokens": round(tokens / len(ok), 1) if ok else None,
        "mean_prompt_tokens": (
            round(sum(r["prompt_tokens"] for r in ok) / len(ok), 1) if ok else None
        ),
        "zero_token_answers": sum(1 for r in ok if r["completion_tokens"] == 0),
        "hit_max_tokens": sum(1 for r in ok if r["finish_reason"] == "length"),
        "server_mean_ms": {
            key: mean_timing(key)
            for key in ("retrieval_ms", "first_token_ms", "generation_ms", "total_ms")
        },
    }


def bench_engine(
    engine: str,
    workspace: Path,
    env: dict[str, str],
    plan: list[tuple[int, list[str]]],
    warmup: list[str],
    args: argparse.Namespace,
    logs: Path,
) -> dict[str, Any]:
    label = LABELS.get(engine, engine)
    print(f"\n[{label}] starting `docent serve --engine {engine}` ...", flush=True)
    server = Server(engine, workspace, env, logs / f"serve-{engine}.log")
    out: dict[str, Any] = {"engine": engine, "log": str(server.log)}
    try:
        startup_s, ready = server.wait_ready(args.startup_timeout)
        out.update(startup_s=round(startup_s, 1), ready=ready, rss_mib_ready=server.rss_mib())
        print(
            f"[{label}] ready in {startup_s:.1f}s: engine {ready.get('engine')}, model "
            f"{ready.get('model')}, adapter {ready.get('adapter')}, {ready.get('chunks')} chunks; "
            f"RSS {_fmt(out['rss_mib_ready'], '{:.0f} MiB')}",
            flush=True,
        )
        warm_wall, warm = asyncio.run(
            run_level(server.url, warmup, 1, args.k, args.request_timeout)
        )
        bad = [r["error"] for r in warm if not r["ok"]]
        out["warmup"] = {"seconds": round(warm_wall, 2), "errors": bad}
        print(f"[{label}] warm-up: {len(warm)} requests in {warm_wall:.1f}s", flush=True)
        if bad:
            raise RuntimeError(f"warm-up request failed: {bad[0]}")
        levels: dict[str, Any] = {}
        answers: dict[str, str] = {}
        for concurrency, questions in plan:
            wall, results = asyncio.run(
                run_level(server.url, questions, concurrency, args.k, args.request_timeout)
            )
            row = summarise(wall, results)
            levels[str(concurrency)] = row
            for r in results:
                if r["ok"] and r["question"] not in answers:
                    answers[r["question"]] = r["answer"]
            print(
                f"[{label}] c={concurrency:<3} {row['ok']}/{row['requests']} ok in "
                f"{row['wall_s']:.1f}s: {row['req_per_s']} req/s, p50 {row['p50_ms']} ms, "
                f"p99 {row['p99_ms']} ms, {row['tokens_per_s']} tok/s "
                f"(mean {row['mean_completion_tokens']} completion tokens)",
                flush=True,
            )
            for err in row["errors"]:
                print(f"[{label}]   error: {err}", flush=True)
        out["levels"] = levels
        out["answers"] = answers
        out["rss_mib_after"] = server.rss_mib()
    except Exception as exc:  # one engine failing must not lose the other's figures
        out["error"] = str(exc)
        print(f"[{label}] FAILED: {exc}", flush=True)
    finally:
        out["stop"] = server.stop()
        print(
            f"[{label}] stopped with {out['stop']['signal']} in {out['stop']['stop_s']}s, exit "
            f"code {out['stop']['exit_code']}"
            + (
                f"; killed leftover pids {out['stop']['leftover_pids_killed']}"
                if out["stop"]["leftover_pids_killed"]
                else ""
            ),
            flush=True,
        )
    return out


# --------------------------------------------------------------------------- report


def _fmt(value: Any, spec: str = "{}") -> str:
    return "n/a" if value is None else spec.format(value)


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def table(runs: dict[str, dict[str, Any]], levels: list[int]) -> tuple[str, dict[str, Any]]:
    lines = [
        "| engine | c | requests | req/s | p50 ms | p99 ms | gen tokens/s | mean completion "
        "tokens | server first-token ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for engine, run in runs.items():
        for c in levels:
            row = run.get("levels", {}).get(str(c))
            if row is None:
                lines.append(f"| {LABELS.get(engine, engine)} | {c} | failed | | | | | | |")
                continue
            ok = f"{row['ok']}/{row['requests']}" if row["ok"] != row["requests"] else row["ok"]
            lines.append(
                f"| {LABELS.get(engine, engine)} | {c} | {ok} | {_fmt(row['req_per_s'], '{:.2f}')} "
                f"| {_fmt(row['p50_ms'], '{:.0f}')} | {_fmt(row['p99_ms'], '{:.0f}')} "
                f"| {_fmt(row['tokens_per_s'], '{:.1f}')} | {row['mean_completion_tokens']} "
                f"| {_fmt(row['server_mean_ms']['first_token_ms'], '{:.0f}')} |"
            )
    ratios: dict[str, Any] = {}
    if "vllm" in runs and "hf" in runs:
        lines += [
            "",
            "| c | vLLM / HF req/s | vLLM / HF tokens/s | HF / vLLM p50 |",
            "|---:|---:|---:|---:|",
        ]
        for c in levels:
            v = runs["vllm"].get("levels", {}).get(str(c)) or {}
            h = runs["hf"].get("levels", {}).get(str(c)) or {}
            r = {
                "req_per_s": _ratio(v.get("req_per_s"), h.get("req_per_s")),
                "tokens_per_s": _ratio(v.get("tokens_per_s"), h.get("tokens_per_s")),
                "p50_hf_over_vllm": _ratio(h.get("p50_ms"), v.get("p50_ms")),
            }
            ratios[str(c)] = r
            lines.append(
                f"| {c} | {_fmt(r['req_per_s'], '{}x')} | {_fmt(r['tokens_per_s'], '{}x')} "
                f"| {_fmt(r['p50_hf_over_vllm'], '{}x')} |"
            )
    return "\n".join(lines), ratios


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", default=None, help="concurrency levels (1,4,16; quick: 1,4)")
    parser.add_argument("--engines", default="vllm,hf", help="engines, in order (vllm,hf)")
    parser.add_argument(
        "--requests", type=int, default=None, help="requests per level (max(2c, 8); quick 2c, 4)"
    )
    parser.add_argument("--quick", action="store_true", help="levels 1,4 and fewer requests")
    parser.add_argument(
        "--max-tokens", type=int, default=64, help="DOCENT_ANSWER_MAX_TOKENS for the servers (64)"
    )
    parser.add_argument("--k", type=int, default=None, help="chunks per question (server top_k)")
    parser.add_argument("--startup-timeout", type=float, default=600.0, help="seconds (600)")
    parser.add_argument("--request-timeout", type=float, default=600.0, help="seconds (600)")
    parser.add_argument("--keep", action="store_true", help="keep the temp workspace and logs")
    parser.add_argument("--out", type=Path, default=OUT_DIR / "serve.json")
    args = parser.parse_args(argv)

    levels = [int(x) for x in (args.levels or ("1,4" if args.quick else "1,4,16")).split(",")]
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    questions = load_questions()
    # Each level takes the next questions in order (wrapping round only when more are asked
    # for than exist), so vLLM's prefix cache sees no repeated prompt; warm-up uses the last two.
    plan: list[tuple[int, list[str]]] = []
    pool = questions[:-2]
    offset = 0
    for c in levels:
        n = args.requests or max(2 * c, 4 if args.quick else 8)
        plan.append((c, [pool[(offset + i) % len(pool)] for i in range(n)]))
        offset += n
    warmup = questions[-2:]

    load_before = os.getloadavg()
    vers = versions()
    print(
        f"python {platform.python_version()}, cpus {os.cpu_count()}, "
        + ", ".join(f"{k} {v}" for k, v in vers.items() if v)
        + f"; engines {','.join(engines)}; levels {levels}, requests "
        f"{[len(q) for _, q in plan]}; max tokens {args.max_tokens}, greedy; "
        f"{len(questions)} answerable handbook questions; load average {load_before[0]:.2f}; "
        f"{summary()}, {auto_dtype()}",
        flush=True,
    )

    env = server_env(args.max_tokens)
    tmp = Path(tempfile.mkdtemp(prefix="docent-bench-serve-"))
    workspace = tmp / "ws"
    started = time.perf_counter()
    try:
        t = time.perf_counter()
        ingest = subprocess.run(
            [docent_exe(), "--workspace", str(workspace), "ingest", str(HANDBOOK)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        ingest_s = time.perf_counter() - t
        if ingest.returncode != 0:
            print(ingest.stdout[-3000:], ingest.stderr[-3000:], sep="\n")
            raise SystemExit(f"`docent ingest` failed with {ingest.returncode}")
        print(f"ingested {HANDBOOK.relative_to(ROOT)} in {ingest_s:.1f}s into {workspace}")

        runs: dict[str, dict[str, Any]] = {}
        for engine in engines:
            runs[engine] = bench_engine(engine, workspace, env, plan, warmup, args, tmp)

        text, ratios = table(runs, levels)
        same = None
        if "vllm" in runs and "hf" in runs:
            a, b = runs["vllm"].get("answers", {}), runs["hf"].get("answers", {})
            both = [q for q in a if q in b]
            if both:
                same = {"identical": sum(a[q] == b[q] for q in both), "compared": len(both)}
        load_after = os.getloadavg()
        total_s = time.perf_counter() - started

        print(f"\n### POST /v1/ask on loopback, handbook workspace, {args.max_tokens} max tokens\n")
        print(text)
        print()
        for engine, run in runs.items():
            label = LABELS.get(engine, engine)
            if "startup_s" in run:
                print(
                    f"{label}: startup {run['startup_s']}s (spawn to /readyz 200), warm-up "
                    f"{run.get('warmup', {}).get('seconds')}s, RSS "
                    f"{_fmt(run.get('rss_mib_ready'), '{:.0f} MiB')} ready / "
                    f"{_fmt(run.get('rss_mib_after'), '{:.0f} MiB')} after, stop "
                    f"{run['stop']['signal']} in {run['stop']['stop_s']}s "
                    f"(exit {run['stop']['exit_code']})"
                )
            if "error" in run:
                print(f"{label}: FAILED, {run['error']}")
            mean = [
                r["mean_completion_tokens"]
                for r in run.get("levels", {}).values()
                if r["mean_completion_tokens"] is not None
            ]
            if mean:
                print(f"{label}: mean completion tokens per level {mean}")
        if same:
            print(
                f"identical answer text vLLM vs HF: {same['identical']}/{same['compared']} "
                "questions (first answer seen per question)"
            )
        print(
            f"\ningest {ingest_s:.1f}s; total {total_s:.0f}s; 1-min load average "
            f"{load_before[0]:.2f} before, {load_after[0]:.2f} after (other processes on the "
            "machine skew timings)"
        )

        for run in runs.values():
            run.pop("answers", None)
        result = {
            "bench": "serve",
            "machine": {"python": platform.python_version(), **describe(), **vers},
            "dtype": auto_dtype(),
            "args": {k: str(v) for k, v in vars(args).items() if k != "out"},
            "levels": levels,
            "requests_per_level": {str(c): len(q) for c, q in plan},
            "ingest_s": round(ingest_s, 1),
            "runs": runs,
            "ratios_vllm_over_hf": ratios,
            "identical_answers": same,
            "total_s": round(total_s, 1),
            "load_average": {"before": load_before, "after": load_after},
            "table": text,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, default=str))
        print(f"written to {args.out}")
        if args.keep:
            print(f"kept {tmp} (workspace and server logs)")
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
