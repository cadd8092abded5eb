"""Consistency checks for the sample handbook corpus and its question set.

    python examples/check_handbook.py [--verbose]

Extracts the text of every corpus file in examples/handbook/ the way a reader
would (Markdown as plain text, HTML from the main <article>, PDF with pypdf,
DOCX with python-docx) and checks examples/handbook/qa.jsonl against it:

* every answerable question's evidence sentence occurs in its source's text
  (whitespace-normalised), and the answer or one of its aliases occurs in the
  evidence (case-insensitive);
* every corpus document has at least two questions;
* train and test splits never share a source document, and the test split has
  at least one HTML, PDF and DOCX document and at least 25 answerable questions;
* there are exactly 10 unanswerable questions, 5 per split;
* HTML article extraction leaves out the site boilerplate.

It also prints warnings (not failures) for answers that appear in another
document next to words from the question, for a human to review.
Exits with status 1 if any check fails.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
from pathlib import Path

from bs4 import BeautifulSoup
from docx import Document
from pypdf import PdfReader

HANDBOOK = Path(__file__).resolve().parent / "handbook"
QA_FILE = HANDBOOK / "qa.jsonl"
CORPUS_SUFFIXES = {".md", ".html", ".pdf", ".docx"}
BOILERPLATE_MARKERS = [
    "Careers",
    "\u00a9 2025 Brindlewood Labs",
    "Related articles",
    "Accept all cookies",
    "Was this article helpful",
]
STOPWORDS = set(
    ["a", "an", "the", "of", "to", "in", "on", "for", "and", "or", "is", "are", "was", "be", "by", "with", "from", "at", "as", "it", "its", "this", "that", "what", "which", "who", "whom", "when", "where", "why", "how", "do", "does", "did", "can", "could", "should", "would", "will", "my", "our", "your", "i", "we", "you", "me", "long", "much", "many", "after", "before", "under", "into", "than", "there", "their", "they", "them", "have", "has", "had", "get", "gets", "any", "per"]
)


def norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def extract(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".md":
        return path.read_text(encoding="utf-8")
    if suffix == ".html":
        soup = BeautifulSoup(path.read_text(encoding="utf-8"), "html.parser")
        main = soup.find("article") or soup.find("main") or soup.body
        return main.get_text(" ")
    if suffix == ".pdf":
        return "\n".join(page.extract_text() or "" for page in PdfReader(str(path)).pages)
    if suffix == ".docx":
        doc = Document(str(path))
        parts = [p.text for p in doc.paragraphs]
        for table in doc.tables:
            for row in table.rows:
                parts.extend(cell.text for cell in row.cells)
        return "\n".join(parts)
    raise ValueError(path)


def contains(haystack: str, needle: str) -> bool:
    """Whitespace-normalised containment, tolerant of 'word ,' from HTML get_text(' ')."""
    h, n = norm(haystack), norm(needle)
    if n in h:
        return True
    squeeze = lambda s: re.sub(r"\s+([,.;:!?)])", r"\1", s)  # noqa: E731
    return squeeze(n) in squeeze(h)


def _mentions(text_lower: str, form: str) -> bool:
    """Case-insensitive occurrence of form as a whole token sequence (so '50' does not match '500')."""
    pattern = r"(?<![\w.,])" + re.escape(form.lower()) + r"(?![\w]|[.,]\d)"
    return re.search(pattern, text_lower) is not None


def content_words(text: str) -> set[str]:
    return {
        w
        for w in re.findall(r"[a-z0-9][a-z0-9_+\-]*", text.lower())
        if w not in STOPWORDS and len(w) > 2
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--verbose", action="store_true", help="list per-document question counts")
    args = parser.parse_args()

    errors: list[str] = []
    warnings: list[str] = []

    docs = sorted(p for p in HANDBOOK.iterdir() if p.suffix.lower() in CORPUS_SUFFIXES)
    texts = {p.name: extract(p) for p in docs}
    by_type = collections.Counter(p.suffix.lower() for p in docs)
    print(
        f"corpus: {len(docs)} documents "
        + ", ".join(f"{k}={v}" for k, v in sorted(by_type.items()))
    )
    for name, text in texts.items():
        words = len(text.split())
        if words < 250:
            errors.append(f"{name}: only {words} words extracted")
        if name.endswith(".html"):
            for marker in BOILERPLATE_MARKERS:
                if marker in text:
                    errors.append(f"{name}: boilerplate {marker!r} inside the extracted article")
            raw = (HANDBOOK / name).read_text(encoding="utf-8")
            for marker in ("Careers", "Related articles", "&copy; 2025 Brindlewood Labs"):
                if marker not in raw:
                    errors.append(
                        f"{name}: expected boilerplate {marker!r} in the page around the article"
                    )

    rows = [
        json.loads(line)
        for line in QA_FILE.read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    required = {"id", "question", "answer", "aliases", "source", "evidence", "split", "answerable"}
    ids = collections.Counter(r.get("id") for r in rows)
    for dup, n in ids.items():
        if n > 1:
            errors.append(f"duplicate id {dup}")
    questions_seen = collections.Counter(r.get("question") for r in rows)
    for dup, n in questions_seen.items():
        if n > 1:
            errors.append(f"duplicate question {dup!r}")

    per_doc = collections.Counter()
    split_sources: dict[str, set[str]] = {"train": set(), "test": set()}
    counts = collections.Counter()
    for r in rows:
        rid = r.get("id")
        missing = required - set(r)
        if missing:
            errors.append(f"{rid}: missing fields {sorted(missing)}")
            continue
        if r["split"] not in ("train", "test"):
            errors.append(f"{rid}: bad split {r['split']!r}")
            continue
        if not isinstance(r["aliases"], list):
            errors.append(f"{rid}: aliases must be a list")
        counts[(r["split"], r["answerable"])] += 1
        if not r["answerable"]:
            if (
                r["answer"] != "unanswerable"
                or r["source"] is not None
                or r["evidence"] is not None
            ):
                errors.append(
                    f"{rid}: unanswerable questions need answer 'unanswerable', source/evidence null"
                )
            continue
        src = r["source"]
        if src not in texts:
            errors.append(f"{rid}: unknown source {src!r}")
            continue
        per_doc[src] += 1
        split_sources[r["split"]].add(src)
        evidence = r["evidence"]
        if not contains(texts[src], evidence):
            errors.append(f"{rid}: evidence not found in {src}: {evidence!r}")
        forms = [r["answer"], *r["aliases"]]
        if not any(f.lower() in evidence.lower() for f in forms if f):
            errors.append(f"{rid}: neither answer nor aliases occur in the evidence")
        if re.search(r"[.!?] [A-Z]", evidence.rstrip(".")) and not re.search(
            r"\b(?:e\.g|i\.e)\. ", evidence
        ):
            warnings.append(f"{rid}: evidence may contain more than one sentence")
        # Ambiguity heuristic: another document containing the answer together with
        # most of the question's content words.
        qwords = content_words(r["question"])
        for other, text in texts.items():
            if other == src:
                continue
            low = norm(text).lower()
            hits = [f for f in forms if f and len(f) >= 2 and _mentions(low, f)]
            if not hits:
                continue
            for sentence in re.split(r"(?<=[.!?])\s+", norm(text)):
                s_low = sentence.lower()
                if any(_mentions(s_low, h) for h in hits):
                    overlap = qwords & content_words(sentence)
                    if len(qwords) and len(overlap) / len(qwords) >= 0.5 and len(overlap) >= 2:
                        warnings.append(
                            f"{rid}: answer {hits[0]!r} also near question words "
                            f"{sorted(overlap)} in {other}: {sentence[:140]!r}"
                        )

    for name in texts:
        if per_doc[name] < 2:
            errors.append(f"{name}: has {per_doc[name]} questions (need at least 2)")
    shared = split_sources["train"] & split_sources["test"]
    if shared:
        errors.append(f"sources in both splits: {sorted(shared)}")
    test_types = {Path(s).suffix for s in split_sources["test"]}
    for needed in (".md", ".html", ".pdf", ".docx"):
        if needed not in test_types:
            errors.append(f"test split has no {needed} document")
    if counts[("test", True)] < 25:
        errors.append(f"test split has only {counts[('test', True)]} answerable questions")
    if counts[("train", False)] != 5 or counts[("test", False)] != 5:
        errors.append("need exactly 5 unanswerable questions in each split")
    answerable_total = counts[("train", True)] + counts[("test", True)]
    if answerable_total < 85:
        errors.append(f"only {answerable_total} answerable questions")

    n_train_docs, n_test_docs = len(split_sources["train"]), len(split_sources["test"])
    print(
        f"documents: train={n_train_docs} test={n_test_docs} "
        f"({n_test_docs / max(1, n_train_docs + n_test_docs):.0%} test)"
    )
    print(f"test documents: {', '.join(sorted(split_sources['test']))}")
    for split in ("train", "test"):
        print(
            f"{split}: {counts[(split, True)]} answerable + {counts[(split, False)]} unanswerable "
            f"= {counts[(split, True)] + counts[(split, False)]}"
        )
    print(f"total: {len(rows)} questions ({answerable_total} answerable)")
    if args.verbose:
        for name in texts:
            split = "test" if name in split_sources["test"] else "train"
            print(f"  {per_doc[name]:2d}  {split:5s}  {name}  ({len(texts[name].split())} words)")

    for w in warnings:
        print("WARNING", w)
    for e in errors:
        print("ERROR", e)
    print("OK" if not errors else f"FAILED with {len(errors)} error(s)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
