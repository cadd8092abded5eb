"""Docent: teach a language model a domain, then answer questions about it.

This package is the small shared core (settings, workspace layout, model registry, errors,
CLI). The stages live in the top-level packages ``ingest``, ``retrieval``, ``raft``,
``serving`` and ``eval`` and import forward along that loop only.
"""

__version__ = "0.1.0"
