"""Retrieval: which chunks matter for this question.

Python API used by the CLI, ``raft`` and ``serving``::

    from retrieval import Retriever, Filters
    retriever = Retriever.from_settings(settings)
    hits = retriever.search("How long is the refund window?", k=5, mode="hybrid")
"""

from retrieval.filters import Filters
from retrieval.retriever import Hit, Retriever

__all__ = ["Filters", "Hit", "Retriever"]
