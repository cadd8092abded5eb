"""Generation cache: what the teacher produced for each chunk, keyed by the chunk's content
hash and the teacher + generation settings (like llama-index's transform cache).

Appended one line per finished chunk and fsynced, so an interrupted build loses at most the
batch in flight, ``--resume`` redoes nothing finished, and ``--refresh`` after an index change
only generates for chunks whose text is new.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from raft.dataset import QAItem


@dataclass
class ChunkResult:
    chunk_id: str
    text_hash: str
    items: list[QAItem] = field(default_factory=list)
    rejected: list[dict[str, str]] = field(default_factory=list)  # {"question", "reason"}
    generated: int = 0  # questions the teacher proposed

    def rejections(self) -> Counter[str]:
        return Counter(r["reason"] for r in self.rejected)


class GenerationCache:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[tuple[str, str], ChunkResult] = {}
        if path.exists():
            self._load()

    def _load(self) -> None:
        with open(self.path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    raw: dict[str, Any] = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash: that chunk is simply redone
                result = ChunkResult(
                    chunk_id=raw["chunk_id"],
                    text_hash=raw["text_hash"],
                    items=[QAItem(**i) for i in raw.get("items", [])],
                    rejected=raw.get("rejected", []),
                    generated=raw.get("generated", 0),
                )
                self.entries[(result.chunk_id, result.text_hash)] = result

    def get(self, chunk_id: str, text_hash: str) -> ChunkResult | None:
        return self.entries.get((chunk_id, text_hash))

    def add(self, results: list[ChunkResult]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            for result in results:
                fh.write(json.dumps(asdict(result), ensure_ascii=False) + "\n")
                self.entries[(result.chunk_id, result.text_hash)] = result
            fh.flush()
            os.fsync(fh.fileno())
