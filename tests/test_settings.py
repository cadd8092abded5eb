"""One settings object: defaults, DOCENT_* environment, CLI overrides, clear refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from docent.settings import DocentSettings


def test_defaults_are_the_embedded_models_and_a_local_workspace(monkeypatch):
    for var in ("DOCENT_HOME", "DOCENT_WORKSPACE", "DOCENT_CHUNK_SIZE"):
        monkeypatch.delenv(var, raising=False)
    settings = DocentSettings()
    assert settings.workspace == Path(".docent")
    assert settings.embedder == settings.generator == "default"
    assert settings.search_mode == "hybrid" and settings.fusion == "rrf"
    assert settings.cache_dir == Path("~/.cache/docent").expanduser()


@pytest.mark.parametrize("var", ["DOCENT_HOME", "DOCENT_WORKSPACE"])
def test_workspace_from_environment(monkeypatch, tmp_path, var):
    monkeypatch.setenv(var, str(tmp_path / "ws"))
    assert DocentSettings().workspace == tmp_path / "ws"


def test_cli_overrides_beat_environment_and_none_means_not_given(monkeypatch, tmp_path):
    monkeypatch.setenv("DOCENT_CHUNK_SIZE", "128")
    monkeypatch.setenv("DOCENT_WORKSPACE", str(tmp_path / "env"))
    base = DocentSettings()
    assert base.chunk_size == 128
    over = base.with_overrides(chunk_size=96, workspace=tmp_path / "cli", top_k=None)
    assert over.chunk_size == 96 and over.workspace == tmp_path / "cli"
    assert over.top_k == base.top_k


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("chunk_overlap", 500, "must be smaller than chunk_size"),
        ("chunk_size", 4, "greater than or equal"),
        ("index_type", "annoy", "flat"),
        ("search_mode", "semantic", "hybrid"),
    ],
)
def test_bad_values_are_refused_with_the_reason(field, value, match):
    with pytest.raises(ValidationError, match=match):
        DocentSettings().with_overrides(**{field: value})
