"""bench/raft_gain.py runs for an hour before it reports: a recipe it cannot even name or
configure must fail here, not 20 minutes into that run."""

from __future__ import annotations

import importlib.util
import re

import pytest

from docent.settings import DocentSettings

from conftest import ROOT


def _raft_gain():
    spec = importlib.util.spec_from_file_location("raft_gain", ROOT / "bench" / "raft_gain.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_recipe_names_a_dataset_and_gives_valid_settings(tmp_path):
    from raft.build import _NAME

    bench = _raft_gain()
    base = DocentSettings(workspace=tmp_path)
    # The first row is what a user gets: Docent's defaults, unchanged.
    assert next(iter(bench.RECIPES)) == "default" and bench.RECIPES["default"] == {}
    for recipe, overrides in bench.RECIPES.items():
        assert _NAME.match(bench.folder_name(recipe)), recipe
        assert set(overrides) <= set(bench.LEVERS), recipe  # recorded in every row
        settings = base.with_overrides(**overrides)
        for key, value in overrides.items():
            assert getattr(settings, key) == value, (recipe, key)
            assert value != getattr(base, key), f"{recipe} sets {key} to its default"
        # Training sees the oracle and its distractors; serving must retrieve as many.
        assert settings.raft_distractors + 1 == settings.top_k, recipe


def test_a_bad_setting_in_a_recipe_is_refused():
    with pytest.raises(ValueError, match=re.escape("train_rehearsal")):
        DocentSettings().with_overrides(train_rehearsal=0.9)
