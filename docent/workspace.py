"""Where each stage keeps its artifacts inside the workspace folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Workspace:
    root: Path

    @property
    def index_dir(self) -> Path:
        """Versioned knowledge store: ``index/v000001/`` folders plus a ``CURRENT`` pointer."""
        return self.root / "index"

    @property
    def raft_dir(self) -> Path:
        return self.root / "raft"

    @property
    def adapters_dir(self) -> Path:
        return self.root / "adapters"

    @property
    def eval_dir(self) -> Path:
        """Finished eval answers (``answers.sqlite``), kept so a re-run resumes."""
        return self.root / "eval"

    @property
    def reports_dir(self) -> Path:
        return self.root / "reports"

    def ensure(self) -> Workspace:
        self.root.mkdir(parents=True, exist_ok=True)
        return self
