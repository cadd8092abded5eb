"""Readers on real files of every supported format, bad input, and how refresh_index skips it.

Every fixture file is generated inside ``tmp_path`` (fpdf2 for PDF, python-docx for DOCX);
nothing is mocked. The embedder is the real default one, loaded once for this module.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import zipfile
from pathlib import Path

import pytest

from docent.settings import DocentSettings
from ingest.readers import UnreadableFileError, read_file

# --------------------------------------------------------------------------- helpers


def make_pdf(pages: list[str], title: str | None = None) -> bytes:
    from fpdf import FPDF

    pdf = FPDF()
    pdf.set_font("Helvetica", size=12)
    if title:
        pdf.set_title(title)
    for text in pages:
        pdf.add_page()
        pdf.multi_cell(0, 10, text)
    return bytes(pdf.output())


def make_docx(path: Path) -> Path:
    import docx

    document = docx.Document()
    document.add_heading("Employee Handbook", level=1)
    document.add_paragraph("Welcome to the company, we are glad you are here.")
    document.add_heading("Leave", level=2)
    document.add_paragraph("Every employee gets 25 days of paid leave per year.")
    table = document.add_table(rows=3, cols=2)
    for r, (kind, days) in enumerate(
        [("Type", "Days"), ("Sick leave", "10"), ("Parental leave", "90")]
    ):
        table.cell(r, 0).text = kind
        table.cell(r, 1).text = days
    document.add_heading("Expenses", level=2)
    document.add_paragraph("Submit receipts within 30 days.")
    document.save(path)
    return path


def write(path: Path, content: str | bytes) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def lines_of(text: str) -> list[str]:
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


# --------------------------------------------------------------------------- text / markdown


def test_txt_whole_text_and_stem_title(tmp_path):
    path = write(
        tmp_path / "shipping-notes.txt",
        "# not a heading in a .txt file\nShipping is free above 50 EUR.\n",
    )
    docs = read_file(path)
    assert len(docs) == 1
    assert docs[0].text == "# not a heading in a .txt file\nShipping is free above 50 EUR.\n"
    assert docs[0].metadata == {"title": "shipping-notes", "format": "txt"}


def test_md_title_from_first_h1_heading(tmp_path):
    path = write(
        tmp_path / "policy.md",
        "Draft, do not share\n\n## Preface\nSome preface.\n\n# Refund Policy\n\n"
        "Refunds take five days.\n\n# Second Top Heading\nMore.\n",
    )
    docs = read_file(path)
    assert len(docs) == 1
    assert docs[0].metadata == {"title": "Refund Policy", "format": "md"}
    assert "Refunds take five days." in docs[0].text


@pytest.mark.parametrize("name", ["guide.markdown", "GUIDE.MD"])
def test_markdown_suffix_variants(tmp_path, name):
    docs = read_file(write(tmp_path / name, "# Setup Guide\n\nInstall it.\n"))
    assert docs[0].metadata["title"] == "Setup Guide"


def test_md_without_h1_falls_back_to_stem_and_bom_is_dropped(tmp_path):
    path = write(tmp_path / "faq.md", "\ufeff## Question\nAnswer.\n".encode())
    [doc] = read_file(path)
    assert doc.metadata["title"] == "faq"
    assert doc.text.startswith("## Question")  # the UTF-8 BOM is not part of the text

    [doc] = read_file(write(tmp_path / "bom.md", "\ufeff# Bom Title\nText.\n".encode()))
    assert doc.metadata["title"] == "Bom Title"


def test_md_title_ignores_comment_lines_in_code_fences(tmp_path):
    path = write(
        tmp_path / "readme.md",
        "```bash\n# install the dependencies\npip install docent\n```\n\n"
        "# Docent Readme\n\nBody.\n",
    )
    assert read_file(path)[0].metadata["title"] == "Docent Readme"


# --------------------------------------------------------------------------- HTML

BOILERPLATE = [
    "We use cookies",
    "Accept all cookies",
    "Consent manager",
    "Acme Home",
    "Site header text",
    "Products menu",
    "Pricing menu",
    "Skip links",
    "Related articles sidebar",
    "Copyright 2024 Acme",
    "Newsletter signup",
    "var tracking",
    ".hidden",
    "Jump menu",
]


def boilerplate_page(wrapper: str) -> str:
    return f"""<!doctype html>
<html><head><title>Acme | Refunds</title>
<style>.hidden {{ display: none }}</style><script>var tracking = 1;</script></head>
<body>
<div class="cookie-banner"><p>We use cookies to improve your visit.</p>
  <button>Accept all cookies</button></div>
<div id="cookie-consent"><p>Consent manager</p></div>
<header><a href="/">Acme Home</a><p>Site header text</p></header>
<nav><ul><li>Products menu</li><li>Pricing menu</li></ul></nav>
<div role="navigation"><p>Skip links</p></div>
<{wrapper}>
  <nav><p>Jump menu</p></nav>
  <h1>Refund policy</h1>
  <p>Refunds are issued within   14 days
     of the request.</p>
  <h2>Exceptions</h2>
  <ul><li>Gift cards are final.</li><li>Sale items are final.</li></ul>
  <table><tr><th>Plan</th><th>Refund window</th></tr><tr><td>Pro</td><td>30 days</td></tr></table>
  <aside><p>Related articles sidebar</p></aside>
  <form><p>Newsletter signup</p><input name="email"></form>
</{wrapper}>
<aside><p>Related articles sidebar</p></aside>
<footer><p>Copyright 2024 Acme</p></footer>
</body></html>"""


@pytest.mark.parametrize("wrapper", ["main", "article"])
def test_html_boilerplate_removed_and_headings_become_markdown(tmp_path, wrapper):
    path = write(tmp_path / "refunds.html", boilerplate_page(wrapper))
    docs = read_file(path)
    assert len(docs) == 1
    text = docs[0].text
    for junk in BOILERPLATE:
        assert junk not in text, f"boilerplate {junk!r} leaked into {text!r}"
    lines = lines_of(text)
    assert "# Refund policy" in lines
    assert "## Exceptions" in lines
    assert lines.index("# Refund policy") < lines.index("## Exceptions")
    assert "Refunds are issued within 14 days of the request." in lines  # whitespace collapsed
    assert "- Gift cards are final." in lines and "- Sale items are final." in lines
    for cell in ("Plan", "Refund window", "Pro", "30 days"):
        assert cell in lines
    assert docs[0].metadata == {"title": "Refund policy", "format": "html"}


def test_html_title_falls_back_to_title_tag_then_stem(tmp_path):
    page = (
        "<html><head><title>Shipping FAQ</title></head><body><p>Ships in 2 days.</p></body></html>"
    )
    [doc] = read_file(write(tmp_path / "ship.htm", page))
    assert doc.metadata["title"] == "Shipping FAQ"
    assert doc.text == "Ships in 2 days."
    [doc] = read_file(write(tmp_path / "untitled.html", "<p>Just a paragraph.</p>"))
    assert doc.metadata["title"] == "untitled"


def test_html_with_only_boilerplate_is_unreadable(tmp_path):
    page = "<html><body><nav><p>Home</p></nav><footer><p>Copyright</p></footer></body></html>"
    with pytest.raises(UnreadableFileError, match="no text could be extracted"):
        read_file(write(tmp_path / "shell.html", page))


def test_html_article_header_keeps_its_heading(tmp_path):
    page = (
        "<html><body><header><p>Site banner</p></header><article><header>"
        "<h1>Travel policy</h1></header><p>Book economy class.</p></article></body></html>"
    )
    [doc] = read_file(write(tmp_path / "travel.html", page))
    assert "Site banner" not in doc.text
    assert "# Travel policy" in lines_of(doc.text)
    assert doc.metadata["title"] == "Travel policy"


def test_html_text_directly_in_divs_is_kept(tmp_path):
    page = (
        "<html><body><main><div class='content'>Our office opens at nine.</div>"
        "<blockquote>Quality first.</blockquote></main></body></html>"
    )
    [doc] = read_file(write(tmp_path / "divs.html", page))
    assert "Our office opens at nine." in doc.text
    assert "Quality first." in doc.text


def test_html_nested_list_parent_text_and_h5_kept(tmp_path):
    page = (
        "<html><body><main><h1>Assets</h1><ul><li>Hardware<ul><li>Laptops</li></ul></li>"
        "</ul><h5>Small print</h5><p>Return on leaving.</p></main></body></html>"
    )
    [doc] = read_file(write(tmp_path / "assets.html", page))
    assert "Hardware" in doc.text
    assert "Small print" in doc.text


# --------------------------------------------------------------------------- PDF / DOCX


def test_pdf_one_document_per_page(tmp_path):
    path = write(
        tmp_path / "guide.pdf",
        make_pdf(
            [
                "Refunds are processed within five business days.",
                "Shipping takes two to four days in Europe.",
            ],
            title="Customer Guide",
        ),
    )
    docs = read_file(path)
    assert [d.metadata["page"] for d in docs] == [1, 2]
    assert "Refunds are processed within five business days." in " ".join(docs[0].text.split())
    assert "Shipping takes two to four days in Europe." in " ".join(docs[1].text.split())
    assert "Shipping" not in docs[0].text and "Refunds" not in docs[1].text
    for doc in docs:
        assert doc.metadata["format"] == "pdf"
        assert doc.metadata["title"] == "Customer Guide"


def test_pdf_blank_page_is_dropped_and_title_falls_back_to_stem(tmp_path):
    path = write(tmp_path / "scan.pdf", make_pdf(["Page one text.", "", "Page three text."]))
    docs = read_file(path)
    assert [d.metadata["page"] for d in docs] == [1, 3]
    assert {d.metadata["title"] for d in docs} == {"scan"}


def test_docx_headings_become_markdown_and_table_text_is_kept(tmp_path):
    [doc] = read_file(make_docx(tmp_path / "handbook.docx"))
    lines = lines_of(doc.text)
    assert "# Employee Handbook" in lines
    assert "## Leave" in lines and "## Expenses" in lines
    assert lines.index("# Employee Handbook") < lines.index("## Leave") < lines.index("## Expenses")
    assert "Every employee gets 25 days of paid leave per year." in lines
    assert "Type | Days" in lines
    assert "Sick leave | 10" in lines and "Parental leave | 90" in lines
    # the table sits between the Leave paragraph and the Expenses heading (reading order)
    assert lines.index("## Leave") < lines.index("Sick leave | 10") < lines.index("## Expenses")
    assert doc.metadata == {"title": "Employee Handbook", "format": "docx"}


# --------------------------------------------------------------------------- JSONL


def test_jsonl_one_document_per_usable_line(tmp_path, caplog):
    records = [
        json.dumps(
            {
                "id": "faq-1",
                "text": "Refunds take five days.",
                "category": "billing",
                "lang": "en",
                "tags": ["money"],
                "extra": {"k": 1},
            }
        ),
        "{not json at all",
        json.dumps({"id": "faq-2", "content": "Shipping is free.", "title": "Shipping"}),
        json.dumps([1, 2, 3]),
        json.dumps({"id": "faq-x", "text": 5}),
        "",
        json.dumps({"id": 7, "body": "Returns need a receipt."}),
        json.dumps({"note": "no text field here"}),
        json.dumps({"text": "A record without an id."}),
    ]
    path = write(tmp_path / "faq.jsonl", "\n".join(records) + "\n")
    with caplog.at_level(logging.WARNING, logger="ingest.readers"):
        docs = read_file(path)
    assert [d.text for d in docs] == [
        "Refunds take five days.",
        "Shipping is free.",
        "Returns need a receipt.",
        "A record without an id.",
    ]
    assert [d.metadata["record"] for d in docs] == ["faq-1", "faq-2", "7", "9"]  # id, else line
    first = docs[0].metadata
    assert first["category"] == "billing" and first["lang"] == "en"
    assert first["format"] == "jsonl"
    assert first["title"] == "faq #faq-1"
    for key in ("tags", "extra", "id", "text"):
        assert key not in first
    assert docs[1].metadata["title"] == "Shipping"  # a title field wins over the default
    assert "content" not in docs[1].metadata
    assert "4 line(s)" in caplog.text  # the malformed lines are reported, not fatal


def test_jsonl_without_any_usable_line_is_unreadable(tmp_path):
    path = write(
        tmp_path / "broken.jsonl",
        "{oops\n[1, 2]\n"
        + json.dumps({"title": "no text"})
        + "\n"
        + json.dumps({"text": None})
        + "\n",
    )
    with pytest.raises(
        UnreadableFileError,
        match="no line is a JSON object with one of the fields text, content, body",
    ):
        read_file(path)


# --------------------------------------------------------------------------- bad input


def _truncated_pdf() -> bytes:
    data = make_pdf(["Page one of a real PDF.", "Page two of a real PDF."])
    return data[: len(data) // 2]


def _zip_garbage() -> bytes:
    return b"PK\x03\x04" + random.Random(1).randbytes(400)


BAD_INPUTS = {
    "empty": ("empty.txt", b"", "empty file"),
    "whitespace-only": ("blank.md", b" \n\t\r\n   \n", "empty file"),
    "binary-txt": (
        "data.txt",
        b"header\x00\x01\x02\x03\xff binary",
        r"binary content \(NUL bytes\)",
    ),
    "binary-jsonl": ("rows.jsonl", b'{"text": "a"}\n\x00\x00\x00', r"binary content \(NUL bytes\)"),
    "invalid-utf8-md": (
        "latin1.md",
        "# Café\nnaïve\n".encode("latin-1"),
        r"not valid UTF-8 text \(invalid continuation byte at byte 5\)",
    ),
    "random-bytes-pdf": (
        "random.pdf",
        random.Random(2).randbytes(2000),
        "corrupt or unparsable pdf: ",
    ),
    "pdf-header-then-garbage": (
        "header.pdf",
        b"%PDF-1.4\n" + random.Random(3).randbytes(500),
        "corrupt or unparsable pdf: ",
    ),
    "truncated-pdf": ("truncated.pdf", None, "corrupt or unparsable pdf: "),
    "zip-garbage-docx": (
        "garbage.docx",
        None,
        "corrupt or unparsable docx: File is not a zip file",
    ),
    "text-as-docx": (
        "renamed.docx",
        b"This is plain text, not a Word file.",
        "corrupt or unparsable docx: ",
    ),
    "unsupported-suffix": ("slides.pptx", b"PK\x03\x04 whatever", r"unsupported file type \.pptx"),
    "no-suffix": ("Makefile", b"all:\n\techo hi\n", r"unsupported file type \(none\)"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_unreadable_with_reason(tmp_path, case):
    name, content, reason = BAD_INPUTS[case]
    if case == "truncated-pdf":
        content = _truncated_pdf()
    elif case == "zip-garbage-docx":
        content = _zip_garbage()
    path = write(tmp_path / name, content)
    with pytest.raises(UnreadableFileError, match=reason) as info:
        read_file(path)
    assert str(info.value).strip(), "the reason must not be empty"


def test_zip_that_is_not_a_docx_is_unreadable(tmp_path):
    path = tmp_path / "archive.docx"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("notes.txt", "not a Word document")
    with pytest.raises(UnreadableFileError, match="corrupt or unparsable docx: .*Content_Types"):
        read_file(path)


def test_truncated_docx_is_unreadable(tmp_path):
    good = make_docx(tmp_path / "good.docx").read_bytes()
    path = write(tmp_path / "cut.docx", good[: len(good) // 2])
    with pytest.raises(UnreadableFileError, match="corrupt or unparsable docx"):
        read_file(path)


def test_bom_and_whitespace_only_text_is_unreadable(tmp_path):
    path = write(tmp_path / "bom.txt", b"\xef\xbb\xbf \n\t\n")
    with pytest.raises(UnreadableFileError, match="no text could be extracted"):
        read_file(path)


# --------------------------------------------------------------------------- pipeline level

LIMIT_MB = 0.005  # 5 kB: the good files below fit, the "huge" one does not


@pytest.fixture(scope="module")
def real_embedder(embedder):
    return embedder  # the session-wide model from conftest


def _corpus(folder: Path) -> Path:
    folder.mkdir(parents=True)
    write(
        folder / "refunds.md",
        "# Refunds\n\nRefunds are processed within five business days."
        "\n\n## Exceptions\n\nGift cards cannot be refunded.\n",
    )
    write(
        folder / "guide.pdf",
        make_pdf(["Orders ship from the Lyon warehouse.", "Express delivery costs twelve euros."]),
    )
    write(folder / "empty.txt", b"")
    write(folder / "binary.txt", b"\x00\x01\x02 not text \x00")
    write(folder / "broken.pdf", b"%PDF-1.7\n" + random.Random(4).randbytes(300))
    write(folder / "huge.md", "# Huge\n\n" + "lorem ipsum dolor " * 600)
    return folder


def _chunks_by_source(index_dir: Path) -> dict[str, list[tuple[int, str, dict]]]:
    from ingest.store import KnowledgeStore

    store = KnowledgeStore.open(index_dir)
    try:
        out: dict[str, list[tuple[int, str, dict]]] = {}
        for chunk in store.docstore.iter_chunks():
            out.setdefault(chunk.source, []).append((chunk.idx, chunk.text, chunk.metadata))
        return {k: sorted(v, key=lambda c: c[0]) for k, v in out.items()}
    finally:
        store.close()


def test_refresh_skips_bad_files_and_indexes_good_ones(tmp_path, real_embedder):
    from ingest.pipeline import refresh_index

    docs = _corpus(tmp_path / "docs")
    assert (docs / "guide.pdf").stat().st_size < LIMIT_MB * 1e6 < (docs / "huge.md").stat().st_size
    settings = DocentSettings(workspace=tmp_path / "ws", max_file_mb=LIMIT_MB)

    report = refresh_index([docs], settings, embedder=real_embedder)

    assert report.published and report.documents == 2
    skipped = dict(report.skipped)
    assert set(skipped) == {"empty.txt", "binary.txt", "broken.pdf", "huge.md"}
    assert skipped["empty.txt"] == "empty file"
    assert "binary content" in skipped["binary.txt"]
    assert skipped["broken.pdf"].startswith("corrupt or unparsable pdf")
    assert "max_file_mb=0.005" in skipped["huge.md"] and "DOCENT_MAX_FILE_MB" in skipped["huge.md"]
    assert not any("previous chunks" in reason for reason in skipped.values())

    chunks = _chunks_by_source(tmp_path / "ws" / "index")
    assert set(chunks) == {"refunds.md", "guide.pdf"}
    assert report.total_chunks == sum(len(v) for v in chunks.values())
    md_text = " ".join(text for _, text, _ in chunks["refunds.md"])
    assert "Gift cards cannot be refunded." in md_text
    assert sorted(meta["page"] for _, _, meta in chunks["guide.pdf"]) == [1, 2]


def test_corrupted_indexed_file_is_skipped_and_keeps_its_chunks(tmp_path, real_embedder):
    from ingest.pipeline import refresh_index

    docs = _corpus(tmp_path / "docs")
    settings = DocentSettings(workspace=tmp_path / "ws", max_file_mb=LIMIT_MB)
    index_dir = tmp_path / "ws" / "index"
    first = refresh_index([docs], settings, embedder=real_embedder)
    assert first.published
    before = _chunks_by_source(index_dir)
    assert before["guide.pdf"]

    # The indexed PDF gets truncated (e.g. a sync client half-way through writing it).
    pdf = docs / "guide.pdf"
    pdf.write_bytes(pdf.read_bytes()[:300])
    second = refresh_index([docs], settings, embedder=real_embedder)
    reason = dict(second.skipped)["guide.pdf"]
    assert reason.startswith("corrupt or unparsable pdf")
    assert "previous chunks are kept" in reason
    assert second.documents_removed == 0 and second.removed == 0
    assert _chunks_by_source(index_dir) == before

    # Another file changes in the same run, so a new version is published: the corrupt
    # file's old chunks are carried into it.
    write(docs / "refunds.md", "# Refunds\n\nRefunds now take three business days.\n")
    third = refresh_index([docs], settings, embedder=real_embedder)
    assert third.published and third.version != first.version
    assert "previous chunks are kept" in dict(third.skipped)["guide.pdf"]
    after = _chunks_by_source(index_dir)
    assert after["guide.pdf"] == before["guide.pdf"]
    assert "three business days" in " ".join(text for _, text, _ in after["refunds.md"])
    assert third.documents == 2


def test_oversized_reason_states_a_size_above_the_limit(tmp_path, real_embedder):
    from ingest.pipeline import refresh_index

    docs = tmp_path / "docs"
    docs.mkdir()
    write(docs / "ok.txt", "Small file.")
    write(docs / "big.txt", "x" * 8_000)
    report = refresh_index(
        [docs],
        DocentSettings(workspace=tmp_path / "ws", max_file_mb=LIMIT_MB),
        embedder=real_embedder,
    )
    reason = dict(report.skipped)["big.txt"]
    stated = float(re.match(r"([\d.]+) ?MB", reason).group(1))
    assert stated > LIMIT_MB, reason


def test_refresh_of_only_bad_files_does_not_abort(tmp_path, real_embedder):
    from ingest.pipeline import refresh_index

    docs = tmp_path / "docs"
    docs.mkdir()
    write(docs / "empty.md", b"")
    write(docs / "noise.txt", os.urandom(64) + b"\x00")
    report = refresh_index(
        [docs], DocentSettings(workspace=tmp_path / "ws"), embedder=real_embedder
    )
    assert sorted(dict(report.skipped)) == ["empty.md", "noise.txt"]
    assert report.total_chunks == 0 and report.documents == 0
