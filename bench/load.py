"""Load: does ``docent serve`` shed load instead of queueing without bound, and recover?

Two real ``docent serve`` subprocesses on loopback answer from the same handbook workspace,
one after the other (2 cores cannot run both fairly):

- **docent**: the shipped admission control, sized here with ``--active`` answers at once and
  ``--queued`` waiting (``DOCENT_MAX_ACTIVE_ANSWERS`` / ``DOCENT_MAX_QUEUED_ANSWERS``); the rest
  get 429 + Retry-After at once.
- **unbounded** (the baseline): the same server with a queue that never fills and a one-hour
  queue timeout, which is what a server without admission control does.

For each ``--levels`` concurrency c, ``max(2c, 8)`` requests (``--requests`` overrides) go out
from c clients, alternating ``POST /v1/ask`` and ``POST /v1/chat/completions``, under a
wall-clock limit per level (``--level-timeout``; requests still open then count as timeouts).
Per level: answered (2xx), shed (429, or 503 with Retry-After), failed (anything else:
5xx without Retry-After, transport errors, timeouts), the error rate (failed / sent), p50/p99
latency of the answered, the p99 time a client waited for *any* reply, and answers/s.
After the top level the load stops, the client waits for the last Retry-After, and
``--recovery`` requests are sent one by one: all must be answered.

Run (from the repository root)::

    HF_HUB_OFFLINE=1 .venv/bin/python bench/load.py                 # levels 1,4,16 (~10 min)
    HF_HUB_OFFLINE=1 .venv/bin/python bench/load.py --levels 1,8 --max-tokens 16

Prints a Markdown table and writes ``bench/out/load.json``. Figures are printed, never
asserted; the ratio line compares docent with the unbounded baseline at the top level.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from serve import (  # noqa: E402  (bench/serve.py: the server process and set-up helpers)
    HANDBOOK,
    OUT_DIR,
    ROOT,
    Server,
    docent_exe,
    load_questions,
    server_env,
    versions,
)

from docent.hardware import auto_dtype, describe, summary  # noqa: E402

CONFIGS = ("docent", "unbounded")


def config_env(base: dict[str, str], config: str, args: argparse.Namespace) -> dict[str, str]:
    env = dict(base, DOCENT_TOP_K=str(args.k), DOCENT_MAX_ACTIVE_ANSWERS=str(args.active))
    if config == "docent":
        env.update(DOCENT_MAX_QUEUED_ANSWERS=str(args.queued), DOCENT_QUEUE_TIMEOUT_S="60")
    else:
        env.update(DOCENT_MAX_QUEUED_ANSWERS="100000", DOCENT_QUEUE_TIMEOUT_S="3600")
    return env


async def one(client: httpx.AsyncClient, n: int, question: str) -> dict[str, Any]:
    if n % 2:
        path = "/v1/chat/completions"
        body: dict[str, Any] = {
            "model": "docent",
            "messages": [{"role": "user", "content": question}],
        }
    else:
        path, body = "/v1/ask", {"question": question}
    started = time.perf_counter()
    try:
        r = await client.post(path, json=body)
    except httpx.HTTPError as exc:
        return {"kind": "failed", "seconds": time.perf_counter() - started, "error": repr(exc)}
    seconds = time.perf_counter() - started
    retry = r.headers.get("retry-after")
    if r.is_success:
        kind = "answered"
    elif r.status_code == 429 or (r.status_code == 503 and retry):
        kind = "shed"
    else:
        kind = "failed"
    return {
        "kind": kind,
        "status": r.status_code,
        "seconds": seconds,
        "retry_after": int(retry) if retry and retry.isdigit() else None,
        "error": None if kind == "answered" else r.text[:200],
    }


async def level(url: str, questions: list[str], concurrency: int, limit_s: float) -> dict:
    sem = asyncio.Semaphore(concurrency)
    results: list[dict[str, Any]] = []

    async def send(client: httpx.AsyncClient, n: int, q: str) -> None:
        async with sem:
            results.append(await one(client, n, q))

    limits = httpx.Limits(max_connections=concurrency + 4)
    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=limit_s, limits=limits) as client:
        tasks = [asyncio.create_task(send(client, n, q)) for n, q in enumerate(questions)]
        _, pending = await asyncio.wait(tasks, timeout=limit_s)
        for task in pending:
            task.cancel()
        timeouts = len(pending)
    wall = time.perf_counter() - started
    return summarise(results, timeouts, wall, len(questions))


def summarise(results: list[dict[str, Any]], timeouts: int, wall: float, sent: int) -> dict:
    answered = [r for r in results if r["kind"] == "answered"]
    shed = [r for r in results if r["kind"] == "shed"]
    failed = [r for r in results if r["kind"] == "failed"]
    ok_ms = np.asarray([r["seconds"] for r in answered]) * 1000
    any_ms = np.asarray([r["seconds"] for r in results]) * 1000

    def pct(values: np.ndarray, q: float) -> float | None:
        return round(float(np.percentile(values, q)), 1) if len(values) else None

    return {
        "sent": sent,
        "answered": len(answered),
        "shed": len(shed),
        "failed": len(failed) + timeouts,
        "timeouts": timeouts,
        "error_rate": round((len(failed) + timeouts) / sent, 3),
        "shed_rate": round(len(shed) / sent, 3),
        "p50_ms": pct(ok_ms, 50),
        "p99_ms": pct(ok_ms, 99),
        "p99_any_reply_ms": pct(any_ms, 99),
        "answers_per_s": round(len(answered) / wall, 3),
        "wall_s": round(wall, 1),
        "max_retry_after_s": max((r["retry_after"] or 0 for r in shed), default=None),
        "errors": [r["error"] for r in failed][:3],
    }


async def recovery(url: str, questions: list[str], wait_s: int, limit_s: float) -> dict:
    await asyncio.sleep(wait_s)
    async with httpx.AsyncClient(base_url=url, timeout=limit_s) as client:
        results = [await one(client, n, q) for n, q in enumerate(questions)]
    return {
        "waited_s": wait_s,
        "sent": len(results),
        "answered": sum(r["kind"] == "answered" for r in results),
        "statuses": [r.get("status") for r in results],
    }


def run_config(
    config: str,
    workspace: Path,
    env: dict[str, str],
    plan: list[tuple[int, list[str]]],
    args: argparse.Namespace,
    logs: Path,
) -> dict[str, Any]:
    server = Server(args.engine, workspace, env, logs / f"serve-{config}.log")
    out: dict[str, Any] = {"config": config}
    try:
        startup_s, ready = server.wait_ready(600)
        out["startup_s"] = round(startup_s, 1)
        print(f"[{config}] ready in {startup_s:.0f}s ({ready.get('engine')})", flush=True)
        asyncio.run(level(server.url, plan[0][1][:1], 1, args.level_timeout))  # warm-up
        out["levels"] = {}
        for concurrency, questions in plan:
            row = asyncio.run(level(server.url, questions, concurrency, args.level_timeout))
            out["levels"][str(concurrency)] = row
            print(f"[{config}] c={concurrency}: {json.dumps(row)}", flush=True)
        wait = max((r["max_retry_after_s"] or 0) for r in out["levels"].values())
        out["recovery"] = asyncio.run(
            recovery(server.url, plan[0][1][: args.recovery], min(wait, 30), args.level_timeout)
        )
        print(f"[{config}] recovery: {out['recovery']}", flush=True)
    except Exception as exc:  # one configuration failing must not lose the other's figures
        out["error"] = str(exc)
        print(f"[{config}] FAILED: {exc}", flush=True)
    finally:
        out["stop"] = server.stop()
    return out


def table(runs: dict[str, dict[str, Any]], levels: list[int]) -> str:
    head = (
        "| server | c | sent | answered | shed (429/503) | failed | error rate | p50 ms | "
        "p99 ms | p99 any reply ms | answers/s |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for config, run in runs.items():
        for c in levels:
            row = run.get("levels", {}).get(str(c))
            if row is None:
                continue
            lines.append(
                f"| {config} | {c} | {row['sent']} | {row['answered']} | {row['shed']} | "
                f"{row['failed']} | {row['error_rate']:.1%} | {row['p50_ms']} | {row['p99_ms']} "
                f"| {row['p99_any_reply_ms']} | {row['answers_per_s']} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", default="hf", help="engine for both servers (hf)")
    parser.add_argument("--levels", default="1,4,16", help="concurrency levels (1,4,16)")
    parser.add_argument("--requests", type=int, default=None, help="per level (max(2c, 8))")
    parser.add_argument("--active", type=int, default=4, help="answers at once (4)")
    parser.add_argument("--queued", type=int, default=4, help="answers waiting, docent (4)")
    parser.add_argument("--max-tokens", type=int, default=32, help="answer cap (32)")
    parser.add_argument("--k", type=int, default=3, help="chunks per question (3)")
    parser.add_argument("--level-timeout", type=float, default=240.0, help="seconds (240)")
    parser.add_argument("--recovery", type=int, default=2, help="requests after the load (2)")
    parser.add_argument("--out", type=Path, default=OUT_DIR / "load.json")
    args = parser.parse_args(argv)

    levels = [int(x) for x in args.levels.split(",")]
    questions = load_questions()
    plan, offset = [], 0
    for c in levels:
        n = args.requests or max(2 * c, 8)
        plan.append((c, [questions[(offset + i) % len(questions)] for i in range(n)]))
        offset += n
    print(
        f"python {platform.python_version()}, cpus {os.cpu_count()}, "
        + ", ".join(f"{k} {v}" for k, v in versions().items() if v)
        + f"; engine {args.engine}; levels {levels}; active {args.active}, queued "
        f"{args.queued}; max tokens {args.max_tokens}, k {args.k}; load {os.getloadavg()[0]:.2f}"
        f"; {summary()}, {auto_dtype()}",
        flush=True,
    )
    base = server_env(args.max_tokens)
    tmp = Path(tempfile.mkdtemp(prefix="docent-bench-load-"))
    try:
        workspace = tmp / "ws"
        subprocess.run(
            [docent_exe(), "--workspace", str(workspace), "ingest", str(HANDBOOK)],
            cwd=ROOT,
            env=base,
            check=True,
            capture_output=True,
        )
        runs = {
            config: run_config(config, workspace, config_env(base, config, args), plan, args, tmp)
            for config in CONFIGS
        }
        print(f"\n### Load on loopback ({args.engine} engine, {args.max_tokens} max tokens)\n")
        print(table(runs, levels))
        top = str(levels[-1])
        ours = runs["docent"].get("levels", {}).get(top, {})
        theirs = runs["unbounded"].get("levels", {}).get(top, {})
        if ours.get("p99_any_reply_ms") and theirs.get("p99_any_reply_ms"):
            print(
                f"\nAt c={top}: p99 wait for any reply, docent / unbounded = "
                f"{ours['p99_any_reply_ms'] / theirs['p99_any_reply_ms']:.2f}x; p99 of answered "
                f"= {_ratio(ours.get('p99_ms'), theirs.get('p99_ms'))}; error rate "
                f"{ours['error_rate']:.1%} vs {theirs['error_rate']:.1%}"
            )
        for config, run in runs.items():
            rec = run.get("recovery")
            if rec:
                print(f"{config}: after the load, {rec['answered']}/{rec['sent']} answered")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "args": vars(args) | {"out": str(args.out)}, "runs": runs,
            "machine": describe(), "dtype": auto_dtype(),
        }))
        print(f"\nwrote {args.out}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "n/a"


if __name__ == "__main__":
    raise SystemExit(main())
