"""Chunker with the real embedder tokenizer: token budget, sections, ids, overlap."""

from __future__ import annotations

import random
import re

import pytest
from llama_index.core.schema import Document

from ingest.chunking import Chunk, Chunker, chunk_id_for
from ingest.readers import read_file


@pytest.fixture(scope="module")
def real_embedder(embedder):
    return embedder  # the session-wide model from conftest


@pytest.fixture(scope="module")
def count(real_embedder):
    return lambda text: len(real_embedder.count_tokens(text))


def chunker(embedder, size: int, overlap: int) -> Chunker:
    return Chunker(size, overlap, embedder.count_tokens)


def md_doc(text: str, title: str | None = None, fmt: str = "md") -> Document:
    meta = {"format": fmt}
    if title is not None:
        meta["title"] = title
    return Document(text=text, metadata=meta)


# --------------------------------------------------------------------------- token budget

VOCAB = [
    "refund",
    "billing",
    "invoice",
    "customer",
    "account",
    "payment",
    "shipping",
    "warehouse",
    "policy",
    "the",
    "a",
    "of",
    "to",
    "and",
    "is",
    "are",
    "supercalifragilisticexpialidocious",
    "naïve",
    "café",
    "Zürich",
    "2024-01-05",
    "e-mail",
    "https://example.com/a/very/long/path?query=1&other=2",
    "日本語のテキスト",
    "ünïcödé",
]


def messy_text(seed: int) -> str:
    """Sentences of very different lengths, headings, lists, a huge unbroken token."""
    rng = random.Random(seed)
    parts = ["# Messy Handbook\n\n"]
    for n in range(rng.randint(30, 60)):
        if n % 11 == 0:
            parts.append(f"\n## Part {n}\n\n")
        if n % 17 == 5:
            parts.append("- " + " ".join(rng.choice(VOCAB) for _ in range(8)) + "\n")
        if n == 23:
            parts.append("".join(rng.choice("ABCDEFabcdef0123456789+/") for _ in range(1500)))
        words = [rng.choice(VOCAB) for _ in range(rng.randint(1, 90))]
        parts.append(
            " ".join(words).capitalize() + rng.choice([". ", "! ", "? ", "; ", ", ", "\n", "\n\n"])
        )
    return "".join(parts)


@pytest.mark.parametrize(("size", "overlap"), [(32, 0), (64, 16), (128, 32), (192, 32)])
@pytest.mark.parametrize("fmt", ["md", "txt"])
def test_chunk_token_counts_never_exceed_chunk_size(real_embedder, count, size, overlap, fmt):
    c = chunker(real_embedder, size, overlap)
    for seed in range(3):
        text = messy_text(seed)
        chunks = c.chunk(f"doc-{seed}", [md_doc(text, "Messy Handbook", fmt)], {})
        assert len(chunks) > 1
        for chunk in chunks:
            n = count(chunk.text)
            assert 0 < n <= size, f"chunk {chunk.idx} has {n} tokens > {size}: {chunk.text!r}"
        joined = " ".join(ch.text for ch in chunks).lower()
        for word in (w for w in VOCAB if w.lower() in text.lower()):  # only the blob is cut
            assert word.lower() in joined, f"{word!r} was lost"


# --------------------------------------------------------------------------- sections

HANDBOOK = """# Handbook

Welcome to the handbook.

## Billing

How billing works.

### Refunds

Refunds are processed within five business days.

#### Card refunds

Card refunds appear on the next statement.

## Shipping

Orders ship from Lyon.

```bash
# not a heading: a shell comment
ship --now
```

### Express

Express costs twelve euros.
"""


def test_markdown_headings_land_in_section_metadata(real_embedder):
    chunks = chunker(real_embedder, 192, 32).chunk(
        "handbook.md", [md_doc(HANDBOOK, "Handbook")], {"source": "handbook.md"}
    )
    by_text = {ch.text.split("\n")[-1]: ch for ch in chunks}
    assert "section" not in by_text["Welcome to the handbook."].metadata  # under the title only
    assert by_text["How billing works."].metadata["section"] == "Billing"
    refunds = by_text["Refunds are processed within five business days."]
    assert refunds.metadata["section"] == "Billing > Refunds"
    assert (
        by_text["Card refunds appear on the next statement."].metadata["section"]
        == "Billing > Refunds > Card refunds"
    )
    assert by_text["```"].metadata["section"] == "Shipping"  # the code comment is no heading
    assert "# not a heading: a shell comment" in by_text["```"].text
    assert by_text["Express costs twelve euros."].metadata["section"] == "Shipping > Express"
    for ch in chunks:
        assert ch.metadata["title"] == "Handbook"
        assert ch.metadata["source"] == "handbook.md"
        assert ch.metadata["format"] == "md"
    assert refunds.embed_text.startswith("Handbook > Billing > Refunds\n")


def test_top_heading_kept_in_section_when_it_is_not_the_title(real_embedder):
    chunks = chunker(real_embedder, 192, 32).chunk(
        "page.html", [md_doc(HANDBOOK, "Acme | Handbook", fmt="html")], {}
    )
    sections = [ch.metadata.get("section") for ch in chunks]
    assert "Handbook > Billing > Refunds" in sections


def test_plain_text_has_no_sections(real_embedder):
    chunks = chunker(real_embedder, 192, 32).chunk(
        "notes.txt", [md_doc(HANDBOOK, "notes", "txt")], {}
    )
    assert chunks and all("section" not in ch.metadata for ch in chunks)


@pytest.mark.parametrize("suffix", ["html", "docx"])
def test_html_and_docx_headings_reach_sections(real_embedder, tmp_path, suffix):
    if suffix == "html":
        path = tmp_path / "policy.html"
        path.write_text(
            "<html><body><nav><p>Menu</p></nav><main><h1>Policy</h1><p>Intro.</p>"
            "<h2>Travel</h2><p>Book economy.</p><h3>Abroad</h3><p>Get a visa.</p>"
            "</main></body></html>",
            encoding="utf-8",
        )
    else:
        import docx

        document = docx.Document()
        document.add_heading("Policy", level=1)
        document.add_paragraph("Intro.")
        document.add_heading("Travel", level=2)
        document.add_paragraph("Book economy.")
        document.add_heading("Abroad", level=3)
        document.add_paragraph("Get a visa.")
        path = tmp_path / "policy.docx"
        document.save(path)
    chunks = chunker(real_embedder, 192, 32).chunk(str(path), read_file(path), {})
    by_last = {ch.text.split("\n")[-1]: ch.metadata.get("section") for ch in chunks}
    assert by_last == {"Intro.": None, "Book economy.": "Travel", "Get a visa.": "Travel > Abroad"}


def test_heading_with_slash_is_one_section_level(real_embedder):
    text = "# Manual\n\n## Input/Output\n\nAbout IO.\n\n### Errors\n\nIO errors are retried.\n"
    chunks = chunker(real_embedder, 192, 32).chunk("manual.md", [md_doc(text, "Manual")], {})
    sections = {ch.text.split("\n")[-1]: ch.metadata.get("section") for ch in chunks}
    assert sections["About IO."] == "Input/Output"
    assert sections["IO errors are retried."] == "Input/Output > Errors"


# --------------------------------------------------------------------------- ids


def test_chunk_ids_are_stable_per_doc_and_position(real_embedder):
    c = chunker(real_embedder, 32, 8)
    doc_id = "/data/handbook.md"
    first = c.chunk(doc_id, [md_doc(HANDBOOK, "Handbook")], {})
    again = c.chunk(doc_id, [md_doc(HANDBOOK, "Handbook")], {})
    assert len(first) > 5
    assert [ch.chunk_id for ch in first] == [ch.chunk_id for ch in again]
    assert [ch.idx for ch in first] == list(range(len(first)))
    assert len({ch.chunk_id for ch in first}) == len(first)  # distinct across positions
    for ch in first:
        assert ch.chunk_id == chunk_id_for(doc_id, ch.idx)
        assert ch.doc_id == doc_id
        assert re.fullmatch(r"[0-9a-f]{16}-\d{5}", ch.chunk_id)

    other = c.chunk("/data/other.md", [md_doc(HANDBOOK, "Handbook")], {})
    assert not {ch.chunk_id for ch in other} & {ch.chunk_id for ch in first}

    # Keyed by position, not content: editing the text keeps the id, changes the hash.
    edited = c.chunk(doc_id, [md_doc(HANDBOOK.replace("Welcome", "Hello"), "Handbook")], {})
    assert edited[0].chunk_id == first[0].chunk_id
    assert edited[0].text_hash != first[0].text_hash
    assert edited[-1].text_hash == first[-1].text_hash


def test_chunk_id_for_is_deterministic():
    assert chunk_id_for("a.md", 3) == chunk_id_for("a.md", 3)
    assert chunk_id_for("a.md", 3) != chunk_id_for("a.md", 4)
    assert chunk_id_for("a.md", 3) != chunk_id_for("b.md", 3)
    assert chunk_id_for("a.md", 3).endswith("-00003")


def test_pages_of_one_source_are_numbered_in_reading_order(real_embedder):
    pages = [
        Document(
            text=f"Page {n} says something about topic {n}.",
            metadata={"title": "Guide", "page": n, "format": "pdf"},
        )
        for n in (1, 2, 3)
    ]
    chunks = chunker(real_embedder, 192, 32).chunk("guide.pdf", pages, {"source": "guide.pdf"})
    assert [ch.idx for ch in chunks] == [0, 1, 2]
    assert [ch.metadata["page"] for ch in chunks] == [1, 2, 3]
    assert len({ch.chunk_id for ch in chunks}) == 3
    assert all(ch.metadata["source"] == "guide.pdf" for ch in chunks)


def test_embed_text_prefixes_title_and_section():
    assert (
        Chunk("i", "d", 0, "Body.", {"title": "T", "section": "A > B"}).embed_text
        == "T > A > B\nBody."
    )
    assert Chunk("i", "d", 0, "Body.", {}).embed_text == "Body."


# --------------------------------------------------------------------------- overlap

SENTENCES = [
    f"Sentence {i} explains rule {i} of the refund policy in plain words." for i in range(40)
]


def _sentences_in(text: str) -> list[str]:
    return [s for s in SENTENCES if s in text]


def test_long_paragraph_is_split_with_overlap(real_embedder, count):
    paragraph = " ".join(SENTENCES)
    doc = [md_doc(paragraph, fmt="txt")]
    with_overlap = chunker(real_embedder, 64, 20).chunk("p.txt", doc, {})
    without = chunker(real_embedder, 64, 0).chunk("p.txt", doc, {})

    for chunks in (with_overlap, without):
        assert len(chunks) > 3
        assert all(count(ch.text) <= 64 for ch in chunks)
        covered = [s for ch in chunks for s in _sentences_in(ch.text)]
        assert set(covered) == set(SENTENCES)  # nothing lost
        assert all(ch.text.startswith("Sentence ") for ch in chunks)  # sentence boundaries kept

    for prev, nxt in zip(with_overlap, with_overlap[1:], strict=False):
        shared = set(_sentences_in(prev.text)) & set(_sentences_in(nxt.text))
        assert shared, f"no overlap between\n{prev.text!r}\n{nxt.text!r}"
        assert _sentences_in(nxt.text)[0] in shared  # the next chunk starts with prev's tail
    for prev, nxt in zip(without, without[1:], strict=False):
        assert not set(_sentences_in(prev.text)) & set(_sentences_in(nxt.text))
    assert len(with_overlap) > len(without)


def test_unpunctuated_run_is_split_by_words_with_overlap(real_embedder, count):
    words = [f"word{i}" for i in range(400)]
    chunks = chunker(real_embedder, 64, 16).chunk("w.txt", [md_doc(" ".join(words), fmt="txt")], {})
    assert len(chunks) > 5
    assert all(count(ch.text) <= 64 for ch in chunks)
    seen = [ch.text.split() for ch in chunks]
    assert set(w for part in seen for w in part) == set(words)
    for prev, nxt in zip(seen, seen[1:], strict=False):
        assert set(prev) & set(nxt), "consecutive chunks share no words"
        assert nxt[0] in prev
