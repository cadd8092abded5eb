"""Metadata filters, applied inside each retriever (not after it), so top-k stays full."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ingest.docstore import DocStore


@dataclass(frozen=True)
class Filters:
    """All given fields must match. ``source`` and ``collection`` match exactly (any of the
    listed values); ``section`` matches case-insensitively anywhere in the section path."""

    source: tuple[str, ...] = ()
    section: str | None = None
    collection: tuple[str, ...] = ()

    @classmethod
    def of(
        cls,
        source: list[str] | str | None = None,
        section: str | None = None,
        collection: list[str] | str | None = None,
    ) -> Filters:
        def tup(v: list[str] | str | None) -> tuple[str, ...]:
            return (v,) if isinstance(v, str) else tuple(v or ())

        return cls(tup(source), section or None, tup(collection))

    @property
    def empty(self) -> bool:
        return not (self.source or self.section or self.collection)

    def allowed_ids(self, docstore: DocStore) -> np.ndarray | None:
        """Vector ids that pass, or ``None`` when there is no filter."""
        if self.empty:
            return None
        where: list[str] = []
        args: list[str] = []
        if self.source:
            where.append(f"source IN ({','.join('?' * len(self.source))})")
            args.extend(self.source)
        if self.collection:
            where.append(f"collection IN ({','.join('?' * len(self.collection))})")
            args.extend(self.collection)
        if self.section:
            where.append("instr(lower(section), ?) > 0")
            args.append(self.section.lower())
        rows = docstore.conn.execute(
            f"SELECT vector_id FROM chunks WHERE {' AND '.join(where)}", args
        )
        return np.fromiter((r[0] for r in rows), dtype=np.int64)
