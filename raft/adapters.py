"""The adapter registry: versioned LoRA adapters in the workspace, one promoted for serving.

Layout under ``<workspace>/adapters``::

    registry.json          {"promoted": "name", "history": ["older", "name"]}
    <name>/                adapter_model.safetensors, adapter_config.json, tokenizer files,
                           metadata.json, report.md, loss.png[, merged/]

With ``DOCENT_STORE=postgresql://…`` registry.json's content lives in the database instead
(``raft.registry_store.open_registry``); the adapters' folders stay here.
"""

from __future__ import annotations

import builtins
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from docent.errors import DocentError
from docent.models import generator_id

REGISTRY = "registry.json"
METADATA = "metadata.json"


class AdapterError(DocentError):
    """An adapter is missing, incompatible or the registry cannot do what was asked."""


@dataclass
class AdapterInfo:
    name: str
    path: Path
    metadata: dict[str, Any]
    promoted: bool = False

    @property
    def base_model(self) -> str:
        return str(self.metadata.get("base_model", ""))

    @property
    def lora_rank(self) -> int:
        """The rank PEFT saved (what an engine must reserve room for)."""
        config = self.path / "adapter_config.json"
        return int(json.loads(config.read_text()).get("r", 16)) if config.exists() else 16


class PromotionStore(Protocol):
    """Where the promoted name and its history live instead of ``registry.json``: the
    Postgres store, so every API replica follows the same one (raft/registry_store.py)."""

    def load(self) -> dict[str, Any] | None: ...

    def save(self, state: dict[str, Any]) -> None: ...


class AdapterRegistry:
    def __init__(self, adapters_dir: Path, promotion: PromotionStore | None = None) -> None:
        self.dir = adapters_dir
        self.promotion = promotion  # None: registry.json in the folder

    def _state(self) -> dict[str, Any]:
        if self.promotion is not None:
            return self.promotion.load() or {"promoted": None, "history": []}
        path = self.dir / REGISTRY
        if not path.exists():
            return {"promoted": None, "history": []}
        return dict(json.loads(path.read_text()))

    def _save(self, state: dict[str, Any]) -> None:
        if self.promotion is not None:
            self.promotion.save(state)
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f"{REGISTRY}.tmp"
        tmp.write_text(json.dumps(state, indent=2))
        os.replace(tmp, self.dir / REGISTRY)

    def list(self) -> list[AdapterInfo]:
        if not self.dir.exists():
            return []
        promoted = self._state().get("promoted")
        found = []
        for folder in sorted(self.dir.iterdir()):
            meta_path = folder / METADATA
            if folder.is_dir() and meta_path.exists():
                meta = json.loads(meta_path.read_text())
                found.append(AdapterInfo(folder.name, folder, meta, folder.name == promoted))
        return found

    def get(self, name: str) -> AdapterInfo:
        folder = self.dir / name
        # A name from a request is not trusted as a path: one that is not a single folder name
        # (a separator, "..", longer than a file name may be) names no adapter, rather than
        # reading outside the registry or failing in the OS.
        single = bool(name) and Path(name).name == name and name not in (".", "..")
        if not (single and len(name.encode()) <= 255 and (folder / METADATA).exists()):
            known = ", ".join(a.name for a in self.list()) or "none"
            raise AdapterError(f"no adapter named {name!r} (known: {known})")
        meta = json.loads((folder / METADATA).read_text())
        return AdapterInfo(name, folder, meta, self._state().get("promoted") == name)

    def latest(self) -> AdapterInfo | None:
        """The most recently trained adapter, promoted or not."""
        found = self.list()
        return max(found, key=lambda a: str(a.metadata.get("created", ""))) if found else None

    def resolve(self, name: str | None) -> AdapterInfo | None:
        """``None``: the promoted adapter; ``latest``: the newest one; else that name."""
        if name is None:
            return self.promoted()
        if name == "latest" and not (self.dir / "latest" / METADATA).exists():
            return self.latest()
        return self.get(name)

    def promoted(self) -> AdapterInfo | None:
        name = self._state().get("promoted")
        return self.get(name) if name else None

    def check_base(self, info: AdapterInfo, generator: str) -> None:
        wanted = generator_id(generator)
        if info.base_model != wanted:
            raise AdapterError(
                f"adapter {info.name!r} was trained on {info.base_model!r}, but the generator "
                f"is {wanted!r}: set DOCENT_GENERATOR to its base or train a new adapter"
            )

    def compatible(self, generator: str) -> builtins.list[AdapterInfo]:
        """The adapters trained on ``generator``."""
        found = []
        for info in self.list():
            try:
                self.check_base(info, generator)
            except AdapterError:
                continue
            found.append(info)
        return found

    def promote(self, name: str, generator: str) -> AdapterInfo:
        info = self.get(name)
        self.check_base(info, generator)
        state = self._state()
        if state.get("promoted") != name:
            state["history"] = [*state.get("history", []), name]
            state["promoted"] = name
            self._save(state)
        return self.get(name)

    def rollback(self) -> AdapterInfo | None:
        """Promote the adapter promoted before the current one (None: back to the base)."""
        state = self._state()
        history = list(state.get("history", []))
        if not history:
            raise AdapterError("nothing to roll back: no adapter has been promoted")
        history.pop()
        state["history"] = history
        state["promoted"] = history[-1] if history else None
        self._save(state)
        return self.promoted()

    def remove(self, name: str) -> None:
        """Delete an adapter. The promoted one, and any a rollback could return to, are kept."""
        info = self.get(name)
        state = self._state()
        if name == state.get("promoted") or name in state.get("history", []):
            raise AdapterError(
                f"adapter {name!r} is promoted or in the promotion history (a rollback may "
                "return to it): it is kept"
            )
        shutil.rmtree(info.path)

    def update_metadata(self, name: str, **fields: Any) -> None:
        info = self.get(name)
        meta = {**info.metadata, **fields}
        tmp = info.path / f"{METADATA}.tmp"
        tmp.write_text(json.dumps(meta, indent=2))
        os.replace(tmp, info.path / METADATA)
