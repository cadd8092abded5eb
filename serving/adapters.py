"""Which LoRA adapter answers a request: the promoted one by default, another by name, or the
base model. Reads the registry per request, so `docent adapters promote` takes effect on a
running server without a restart (on every replica: with a Postgres store the promotion is
kept in the database, raft/registry_store.py)."""

from __future__ import annotations

import logging
import threading

from docent.engine import Engine
from docent.settings import DocentSettings
from raft.adapters import AdapterInfo, AdapterRegistry
from raft.registry_store import open_registry

log = logging.getLogger(__name__)
BASE = "base"
PROMOTED = "promoted"


class AdapterCatalog:
    def __init__(
        self, settings: DocentSettings, engine: Engine, registry: AdapterRegistry | None = None
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.registry = registry or open_registry(settings)
        self.loaded: set[str] = set()
        self.lock = threading.Lock()

    def warm(self) -> list[str]:
        """Load every adapter trained on this generator, so the first request naming one does
        not pay for loading it."""
        for info in self.compatible():
            self._load(info)
        return sorted(self.loaded)

    def compatible(self) -> list[AdapterInfo]:
        return self.registry.compatible(self.settings.generator)

    def default_name(self) -> str | None:
        return self.resolve(None)

    def resolve(self, name: str | None) -> str | None:
        """The engine's adapter name for a request's ``adapter`` (None: the base model)."""
        wanted = name or self.settings.serve_adapter
        if wanted == BASE:
            return None
        info = self.registry.promoted() if wanted == PROMOTED else self.registry.get(wanted)
        if info is None:
            return None  # nothing promoted yet: the base model answers
        self.registry.check_base(info, self.settings.generator)
        self._load(info)
        return info.name

    def _load(self, info: AdapterInfo) -> None:
        with self.lock:
            if info.name not in self.loaded:
                self.engine.add_adapter(info.name, str(info.path))
                self.loaded.add(info.name)
                log.info("loaded adapter %s from %s", info.name, info.path)
