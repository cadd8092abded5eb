"""Read RAFT sets back: list them, summarise one, and render examples for people."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from docent.prompts import ANSWER_PREFIX, BEGIN_QUOTE, END_QUOTE
from raft.build import LATEST, RaftBuildError
from raft.dataset import VALIDATION_QUESTIONS


def resolve(raft_dir: Path, name: str | None) -> Path:
    if name is None:
        pointer = raft_dir / LATEST
        if not pointer.exists():
            raise RaftBuildError(f"no RAFT set in {raft_dir}: run `docent raft build` first")
        name = pointer.read_text().strip()
    folder = raft_dir / name
    if not (folder / "manifest.json").exists():
        known = ", ".join(list_sets(raft_dir)) or "none"
        raise RaftBuildError(f"no RAFT set named {name!r} (known: {known})")
    return folder


def list_sets(raft_dir: Path) -> list[str]:
    if not raft_dir.exists():
        return []
    return sorted(p.name for p in raft_dir.iterdir() if (p / "manifest.json").exists())


def load_manifest(folder: Path) -> dict[str, Any]:
    return dict(json.loads((folder / "manifest.json").read_text()))


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def load_examples(folder: Path, split: str) -> list[dict[str, Any]]:
    return _jsonl(folder / f"{split}.jsonl")


def load_validation_questions(folder: Path) -> list[dict[str, Any]]:
    """Rows (``{"meta": ...}``) of every validation question of a set; sets built before
    the file existed give their validation examples."""
    path = folder / VALIDATION_QUESTIONS
    return _jsonl(path) if path.exists() else load_examples(folder, "validation")


def assistant_text(record: dict[str, Any]) -> str:
    if "messages" in record:
        return str(record["messages"][-1]["content"])
    return str(record["completion"][-1]["content"])


def highlight(text: str) -> str:
    """Rich markup: quotes in green, the final answer in bold."""
    from rich.markup import escape

    text = escape(text)
    text = re.sub(
        re.escape(BEGIN_QUOTE) + r"(.*?)" + re.escape(END_QUOTE),
        lambda m: f"[green]{BEGIN_QUOTE}{m.group(1)}{END_QUOTE}[/green]",
        text,
        flags=re.DOTALL,
    )
    return text.replace(escape(ANSWER_PREFIX), f"[bold magenta]{escape(ANSWER_PREFIX)}[/]")
