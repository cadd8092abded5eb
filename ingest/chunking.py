"""Chunking: token-aware, sentence-respecting, headings kept as metadata (llama-index parsers).

Markdown-style text (Markdown, and HTML/DOCX after the readers) is first split at headings by
``MarkdownNodeParser``; each section is then split by ``SentenceSplitter`` into chunks of at
most ``chunk_size`` tokens of the embedder's tokenizer, so chunks are never silently truncated
by the embedder and the same token budget holds at training and serving time.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llama_index.core.node_parser import MarkdownNodeParser, SentenceSplitter
from llama_index.core.schema import Document

MARKDOWN_FORMATS = {"md", "markdown", "html", "docx"}
HEADER_SEPARATOR = "\x1f"


@dataclass
class Chunk:
    chunk_id: str
    doc_id: str
    idx: int
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def embed_text(self) -> str:
        """What the embedder and BM25 see: the chunk with its title and section as context."""
        heading = " > ".join(
            x for x in (self.metadata.get("title"), self.metadata.get("section")) if x
        )
        return f"{heading}\n{self.text}" if heading else self.text

    @property
    def text_hash(self) -> str:
        return hashlib.sha256(self.embed_text.encode("utf-8")).hexdigest()


def chunk_id_for(doc_id: str, idx: int) -> str:
    """Chunks are keyed by (document, position), never by document alone."""
    return f"{hashlib.sha1(doc_id.encode('utf-8')).hexdigest()[:16]}-{idx:05d}"


class Chunker:
    def __init__(
        self, chunk_size: int, chunk_overlap: int, tokenize: Callable[[str], list[Any]]
    ) -> None:
        self.splitter = SentenceSplitter(
            chunk_size=chunk_size,
            chunk_overlap=chunk_overlap,
            tokenizer=tokenize,
            include_prev_next_rel=False,
        )
        # A separator no heading contains, so "Input/Output" stays one heading.
        self.markdown = MarkdownNodeParser(
            include_prev_next_rel=False, header_path_separator=HEADER_SEPARATOR
        )

    def chunk(
        self, doc_id: str, docs: list[Document], base_metadata: dict[str, Any]
    ) -> list[Chunk]:
        """Chunks of all documents read from one source, numbered in reading order."""
        chunks: list[Chunk] = []
        for doc in docs:
            for section_text, section in self._sections(doc):
                piece = Document(text=section_text)
                for node in self.splitter.get_nodes_from_documents([piece]):
                    text = node.get_content().strip()
                    if not text:
                        continue
                    meta = {**base_metadata, **doc.metadata}
                    if section:
                        meta["section"] = section
                    idx = len(chunks)
                    chunks.append(Chunk(chunk_id_for(doc_id, idx), doc_id, idx, text, meta))
        return chunks

    def _sections(self, doc: Document) -> list[tuple[str, str]]:
        if doc.metadata.get("format") not in MARKDOWN_FORMATS:
            return [(doc.text, "")]
        sections = []
        for node in self.markdown.get_nodes_from_documents([doc]):
            text = node.get_content()
            first, _, body = text.lstrip().partition("\n")
            if first.startswith("#") and not body.strip():
                continue  # a bare heading: it lives on in the section path of what follows
            parents = [
                p for p in str(node.metadata.get("header_path", "")).split(HEADER_SEPARATOR) if p
            ]
            own = first.lstrip("#").strip() if first.startswith("#") else ""
            path = [p for p in [*parents, own] if p]
            if path and path[0] == doc.metadata.get("title"):
                path = path[1:]  # the top heading is the title, kept as ``title`` already
            sections.append((text, " > ".join(path)))
        return sections
