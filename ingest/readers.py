"""Readers: one file in, llama-index ``Document`` objects out (text + metadata).

Thin wrappers over well-kept parsers (pypdf, python-docx, BeautifulSoup) rather than
llama-index's file readers, which live in extra packages that pull many more dependencies.
HTML and DOCX are turned into Markdown-style text so that headings reach the chunker as
sections, the same way Markdown files do.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

from llama_index.core.schema import Document

log = logging.getLogger(__name__)

TEXT_SUFFIXES = {".txt", ".md", ".markdown"}
HTML_SUFFIXES = {".html", ".htm"}
SUPPORTED_SUFFIXES = TEXT_SUFFIXES | HTML_SUFFIXES | {".pdf", ".docx", ".jsonl"}
# Tags whose text is page furniture, not content.
HTML_BOILERPLATE = [
    "script",
    "style",
    "noscript",
    "nav",
    "footer",
    "aside",
    "form",
    "iframe",
    "svg",
    "button",
]
HTML_HEADINGS = ["h1", "h2", "h3", "h4", "h5", "h6"]
HTML_BLOCKS = [
    *HTML_HEADINGS,
    "p",
    "li",
    "td",
    "th",
    "pre",
    "dt",
    "dd",
    "div",
    "section",
    "blockquote",
    "figcaption",
]
JSONL_TEXT_FIELDS = ("text", "content", "body")


class UnreadableFileError(Exception):
    """The file cannot be turned into text; the message is the reason shown to the user."""


def is_supported(path: Path) -> bool:
    return path.suffix.lower() in SUPPORTED_SUFFIXES


def read_file(path: Path) -> list[Document]:
    """Documents in ``path``. Raises :class:`UnreadableFileError` with a readable reason."""
    suffix = path.suffix.lower()
    reader = _READERS.get(suffix) or (_read_text if suffix in TEXT_SUFFIXES else None)
    if reader is None:
        raise UnreadableFileError(f"unsupported file type {suffix or '(none)'}")
    data = path.read_bytes()
    if not data.strip():
        raise UnreadableFileError("empty file")
    try:
        docs = reader(path, data)
    except UnreadableFileError:
        raise
    except Exception as exc:  # parsers raise many types on corrupt input
        raise UnreadableFileError(f"corrupt or unparsable {suffix[1:]}: {exc}") from exc
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise UnreadableFileError("no text could be extracted")
    return docs


def _decode(data: bytes) -> str:
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise UnreadableFileError("UTF-16 text: save the file as UTF-8")
    if b"\x00" in data[:8192]:
        raise UnreadableFileError("binary content (NUL bytes) in a text file")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UnreadableFileError(
            f"not valid UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from exc


def _title_from_markdown(text: str, fallback: str) -> str:
    in_code = False
    for line in text.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            in_code = not in_code
        elif not in_code and line.startswith("# "):
            return line[2:].strip()
    return fallback


def _read_text(path: Path, data: bytes) -> list[Document]:
    text = _decode(data)
    title = _title_from_markdown(text, path.stem) if path.suffix.lower() != ".txt" else path.stem
    return [Document(text=text, metadata={"title": title, "format": path.suffix.lower()[1:]})]


def _read_html(path: Path, data: bytes) -> list[Document]:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(_decode(data), "lxml")
    page_title = soup.title.get_text(strip=True) if soup.title else ""
    for tag in soup(HTML_BOILERPLATE):
        tag.decompose()
    for tag in soup.select('[role="navigation"], [class*="cookie"], [id*="cookie"]'):
        tag.decompose()
    for tag in soup("header"):
        # A site header is furniture; an article's own header carries its title.
        if not tag.find_parent(["main", "article"]) or not tag.find(HTML_HEADINGS):
            tag.decompose()
    main = soup.find("main") or soup.find("article") or soup.body or soup
    lines: list[str] = []
    for el in main.find_all(HTML_BLOCKS):
        if el.find(HTML_BLOCKS):
            # A container: its blocks are visited on their own; keep only its loose text.
            own = " ".join(t.strip() for t in el.find_all(string=True, recursive=False))
            text = " ".join(own.split())
        else:
            text = " ".join(el.get_text(" ", strip=True).split())
        if not text:
            continue
        if el.name in HTML_HEADINGS:
            lines.append(f"\n{'#' * int(el.name[1])} {text}\n")
        elif el.name == "li":
            lines.append(f"- {text}")
        else:
            lines.append(text + "\n")
    body = "\n".join(lines).strip()
    title = _title_from_markdown(body, page_title or path.stem)
    return [Document(text=body, metadata={"title": title, "format": "html"})]


def _read_pdf(path: Path, data: bytes) -> list[Document]:
    import io

    from pypdf import PdfReader

    reader = PdfReader(io.BytesIO(data))
    meta_title = (reader.metadata.title if reader.metadata else None) or path.stem
    docs = []
    for number, page in enumerate(reader.pages, start=1):
        text = page.extract_text() or ""
        if text.strip():
            docs.append(
                Document(
                    text=text, metadata={"title": str(meta_title), "page": number, "format": "pdf"}
                )
            )
    return docs


def _read_docx(path: Path, data: bytes) -> list[Document]:
    import io

    import docx
    from docx.table import Table
    from docx.text.paragraph import Paragraph

    document = docx.Document(io.BytesIO(data))
    lines: list[str] = []
    for block in document.element.body.iterchildren():
        tag = block.tag.rsplit("}", 1)[-1]
        if tag == "p":
            para = Paragraph(block, document)
            text = para.text.strip()
            style = (para.style.name if para.style is not None else "") or ""
            if not text:
                continue
            if style.startswith("Heading") and style[-1:].isdigit():
                lines.append(f"\n{'#' * int(style[-1])} {text}\n")
            elif style == "Title":
                lines.append(f"\n# {text}\n")
            else:
                lines.append(text + "\n")
        elif tag == "tbl":
            table = Table(block, document)
            for row in table.rows:
                cells = [" ".join(c.text.split()) for c in row.cells]
                lines.append(" | ".join(cells))
            lines.append("")
    body = "\n".join(lines).strip()
    core_title = document.core_properties.title
    title = _title_from_markdown(body, core_title or path.stem)
    return [Document(text=body, metadata={"title": title, "format": "docx"})]


def _read_jsonl(path: Path, data: bytes) -> list[Document]:
    docs = []
    bad = 0
    for number, line in enumerate(_decode(data).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        text = next(
            (
                record[f]
                for f in JSONL_TEXT_FIELDS
                if isinstance(record, dict) and isinstance(record.get(f), str)
            ),
            None,
        )
        if not text:
            bad += 1
            continue
        key = str(record.get("id", number))
        metadata = {
            k: v
            for k, v in record.items()
            if k not in JSONL_TEXT_FIELDS and isinstance(v, str | int | float) and k != "id"
        }
        metadata.update({"record": key, "format": "jsonl"})
        metadata.setdefault("title", f"{path.stem} #{key}")
        docs.append(Document(text=text, metadata=metadata))
    if bad:
        log.warning(
            "%s: %d line(s) without a JSON object with a text field were skipped", path, bad
        )
    if not docs and bad:
        raise UnreadableFileError(
            f"no line is a JSON object with one of the fields {', '.join(JSONL_TEXT_FIELDS)}"
        )
    return docs


_READERS: dict[str, Callable[[Path, bytes], list[Document]]] = {
    ".html": _read_html,
    ".htm": _read_html,
    ".pdf": _read_pdf,
    ".docx": _read_docx,
    ".jsonl": _read_jsonl,
}
