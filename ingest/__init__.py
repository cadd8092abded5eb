"""Ingest: read domain documents, chunk them, embed them, keep a versioned knowledge store.

Entry point: :func:`ingest.pipeline.refresh_index`. Later stages read what this writes through
:class:`ingest.store.KnowledgeStore`.
"""
