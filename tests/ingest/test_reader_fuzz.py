"""Fuzzing the document readers (hypothesis): random bytes, and real handbook files with bytes
flipped, cut or spliced in. Every input either gives documents with text or fails with an
``UnreadableFileError`` that says why; nothing else escapes (a refresh then skips the file)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.readers import UnreadableFileError, read_file

from conftest import HANDBOOK

SAMPLES = {
    ".pdf": HANDBOOK / "service-level-agreement.pdf",
    ".docx": HANDBOOK / "accessibility-statement.docx",
    ".html": HANDBOOK / "help-guest-access.html",
    ".md": HANDBOOK / "getting-started.md",
    ".jsonl": HANDBOOK / "qa.jsonl",
}
FUZZ = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@st.composite
def damaged(draw: st.DrawFn, original: bytes) -> bytes:
    """The file with a few random edits: flipped bytes, a cut, or junk spliced in."""
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, max(0, len(data) - 1)))
        edit = draw(st.sampled_from(["flip", "cut", "splice", "truncate"]))
        if edit == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif edit == "cut":
            del data[at : at + draw(st.integers(1, 512))]
        elif edit == "splice":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        else:
            del data[at:]
    return bytes(data)


def check(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    try:
        docs = read_file(path)
    except UnreadableFileError as exc:
        assert str(exc)  # a reason the operator can read
        return
    assert docs and all(isinstance(d.text, str) and d.text.strip() for d in docs)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("suffix", sorted(SAMPLES))
def test_damaged_files_are_read_or_refused_with_a_reason(tmp_path, suffix):
    original = SAMPLES[suffix].read_bytes()

    @FUZZ
    @given(data=damaged(original))
    def run(data: bytes) -> None:
        check(tmp_path / f"doc{suffix}", data)

    run()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("suffix", [".pdf", ".docx", ".html", ".md", ".txt", ".jsonl"])
def test_random_bytes_and_text_are_read_or_refused_with_a_reason(tmp_path, suffix):
    @FUZZ
    @given(data=st.one_of(st.binary(max_size=4096), st.text(max_size=2000).map(str.encode)))
    def run(data: bytes) -> None:
        check(tmp_path / f"doc{suffix}", data)

    run()
