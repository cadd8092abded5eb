"""Embedding precision (fp32, bf16, int8, auto): vectors close to fp32's, recorded in the index,
queries embedded like the index, and a change of precision only through --rebuild. Real
models (bf16 through torch autocast, int8 through an ONNX export run by ONNX Runtime), a real
FAISS index and a real Postgres store."""

from __future__ import annotations

import json
import logging

import numpy as np
import pydantic
import pytest

from docent.errors import IndexMismatchError
from docent.hardware import cpu_has_bf16
from docent.settings import DocentSettings
from ingest import embed_precision
from ingest.pipeline import refresh_index
from ingest.stores import open_store
from retrieval import Retriever

from conftest import HANDBOOK, STORES, settings_on, write_corpus

DOCS = {
    "lighthouse.md": "# Lighthouse\n\nThe keeper of the Varrow lighthouse is Ilse Montague. "
    "The lamp turns every 11 seconds and was installed in 1911.\n",
    "bakery.md": "# Bakery\n\nThe Cobble Lane bakery opens at 05:40 on weekdays. Its rye loaf "
    "uses a starter called Old Bertram.\n",
    "ferry.md": "# Ferry\n\nThe Saltmarsh ferry crosses to Quarry Isle in 27 minutes and "
    "costs 3.20 EUR for adults.\n",
}


def _handbook_texts(n: int = 24) -> list[str]:
    texts = [p.read_text(encoding="utf-8")[:900] for p in sorted(HANDBOOK.rglob("*.md"))]
    return texts[:n]


@pytest.mark.parametrize(
    ("precision", "min_cosine"), [("fp32", 1 - 1e-6), ("bf16", 0.999), ("int8", 0.95)]
)
def test_lower_precisions_stay_close_to_fp32(embedder, precision, min_cosine):
    texts = _handbook_texts()
    reference = embedder.encode(texts)
    other = embedder.at_precision(precision)
    assert other.precision == precision and other.dim == embedder.dim
    assert embedder.at_precision(precision) is other  # loaded once, shared
    assert other.at_precision("fp32") is embedder
    vectors = other.encode(texts)
    assert vectors.dtype == np.float32 and vectors.shape == reference.shape
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    cosines = (vectors * reference).sum(axis=1)
    assert cosines.min() >= min_cosine
    if precision != "fp32":
        assert cosines.min() < 1 - 1e-7  # really computed another way
    # each text is still nearest to its own fp32 vector
    assert (np.argmax(vectors @ reference.T, axis=1) == np.arange(len(texts))).all()
    # a question alone (the fast path of /v1/ask) gets the vector a batch of one gets
    question = "When does the support desk answer tickets?"
    np.testing.assert_allclose(other.encode_query(question), other.encode([question])[0], atol=2e-6)
    for text in texts[:4]:  # long ones too: the ONNX Runtime graph takes any length
        np.testing.assert_allclose(other.encode_query(text), other.encode([text])[0], atol=2e-6)
    if precision == "fp32":
        # at fp32 on a CPU, questions run on ONNX Runtime's fused graph (torch embeds batches)
        from ingest.onnx_embedder import OnnxEncoder

        assert isinstance(other._question_model()[0].model, OnnxEncoder)


def test_int8_model_is_built_once_in_the_cache(embedder):
    from docent.models import embedder_path
    from ingest.onnx_embedder import onnx_model_file

    first = onnx_model_file(embedder_path(), embedder.cache_dir, "int8")
    stamp = first.stat().st_mtime_ns
    assert onnx_model_file(embedder_path(), embedder.cache_dir, "int8") == first
    assert first.stat().st_mtime_ns == stamp
    assert first.parent.parent == embedder.cache_dir  # outside the clone, beside SmolLM2
    assert [f.name for f in first.parent.iterdir()] == [first.name]  # no export left behind
    # ONNX Runtime's BERT fusions ran before quantizing: the int8 speed depends on them
    import onnx

    ops = [n.op_type for n in onnx.load(str(first), load_external_data=False).graph.node]
    layers = embedder.model[0].auto_model.config.num_hidden_layers
    assert ops.count("QAttention") == layers
    assert "EmbedLayerNormalization" in ops and "MatMulInteger" in ops  # embeddings stay fp32


def test_int8_on_a_cpu_without_an_int8_dot_product_gets_7_bit_weights(embedder, monkeypatch):
    from docent.models import embedder_path
    from ingest import onnx_embedder

    # A CPU can't turn into the other kind; the flag check is what is replaced, so both
    # exports are built and run on either kind (one of them is this CPU's own, cached).
    monkeypatch.setattr(onnx_embedder, "cpu_has_int8_dot", lambda: True)
    eight = onnx_embedder.onnx_model_file(embedder_path(), embedder.cache_dir, "int8")
    monkeypatch.setattr(onnx_embedder, "cpu_has_int8_dot", lambda: False)
    seven = onnx_embedder.onnx_model_file(embedder_path(), embedder.cache_dir, "int8")
    assert seven.parent.name != eight.parent.name  # cached apart: a CPU change rebuilds
    texts = _handbook_texts(8)
    reference = embedder.encode(texts)
    model = embedder.model.__class__(embedder_path(), device="cpu")
    onnx_embedder.run_on_onnx(model, seven)
    vectors = model.encode(texts, normalize_embeddings=True)
    cosines = (vectors * reference).sum(axis=1)
    assert 0.95 <= cosines.min() < 1 - 1e-7


def test_explicit_precision_is_taken_as_given(tmp_path):
    for p in embed_precision.PRECISIONS:
        assert embed_precision.resolve_precision(p, "default", "cpu", tmp_path) == p
    assert not (tmp_path / "embed-precision").exists()  # nothing measured
    with pytest.raises(pydantic.ValidationError, match="embed_precision"):
        DocentSettings(embed_precision="fp16")


def test_auto_measures_once_per_machine(tmp_path):
    choice = embed_precision.resolve_precision("auto", "default", "cpu", tmp_path)
    files = list((tmp_path / "embed-precision").glob("*.json"))
    if not cpu_has_bf16():
        # bf16 would be emulated: fp32 without measuring
        assert choice == "fp32" and not files
        return
    assert choice in ("fp32", "bf16") and len(files) == 1
    record = json.loads(files[0].read_text())
    assert record["choice"] == choice and record["min_cosine_bf16"] >= 0.999
    assert set(record["texts_per_s"]) == {"fp32", "bf16"}
    # remembered: a forged record is believed (no second measurement) ...
    files[0].write_text(json.dumps({**record, "choice": "fp32"}))
    assert embed_precision.resolve_precision("auto", "default", "cpu", tmp_path) == "fp32"
    # ... and a damaged one is measured again (the choice may differ on a busy machine)
    files[0].write_text("{not json")
    again = embed_precision.resolve_precision("auto", "default", "cpu", tmp_path)
    assert json.loads(files[0].read_text())["choice"] == again


@pytest.mark.parametrize("store", STORES)
def test_index_keeps_its_precision_and_a_change_needs_rebuild(store, request, tmp_path, embedder):
    corpus = write_corpus(tmp_path / "docs", DOCS)
    at = {
        p: settings_on(store, request, workspace=tmp_path / "ws", embed_precision=p)
        for p in ("auto", "fp32", "int8")
    }
    # the fp32 session embedder is given, the settings ask for int8: the index is int8
    first = refresh_index([corpus], at["int8"], embedder=embedder)
    assert first.published
    live = open_store(at["int8"])
    assert live.manifest["embed_precision"] == "int8"
    live.close()

    # an explicit other precision is refused; nothing stored is lost
    (corpus / "museum.md").write_text("# Museum\n\nThe Tidewater museum shuts on Tuesdays.\n")
    with pytest.raises(IndexMismatchError, match=r"int8.*--rebuild"):
        refresh_index([corpus], at["fp32"], embedder=embedder)
    live = open_store(at["fp32"])
    assert live.version == first.version and live.manifest["n_chunks"] == first.total_chunks
    live.close()

    # auto keeps the index's precision, whatever the embedder handed in
    second = refresh_index([corpus], at["auto"], embedder=embedder)
    assert second.published and second.added == 1 and second.embedded == 1
    live = open_store(at["auto"])
    assert live.manifest["embed_precision"] == "int8"
    live.close()

    # queries follow the index, even when the settings say otherwise
    retriever = Retriever(at["fp32"], embedder=embedder)
    try:
        assert retriever.query_embedder().precision == "int8"
        hits = retriever.search("Which day is the Tidewater museum closed?", k=1, mode="dense")
        assert hits[0].source == "museum.md"
    finally:
        retriever.close()

    # --rebuild re-embeds everything at the asked precision
    rebuilt = refresh_index([corpus], at["fp32"], embedder=embedder, rebuild=True)
    assert rebuilt.published and rebuilt.embedded == rebuilt.total_chunks
    live = open_store(at["fp32"])
    assert live.manifest["embed_precision"] == "fp32"
    live.close()


def test_an_index_from_before_precisions_is_fp32(tmp_path, embedder, caplog):
    corpus = write_corpus(tmp_path / "docs", DOCS)
    settings = DocentSettings(workspace=tmp_path / "ws", embed_precision="fp32")
    refresh_index([corpus], settings, embedder=embedder)
    index = settings.workspace / "index"
    (version,) = [p for p in index.glob("v*") if p.is_dir()]
    manifest = json.loads((version / "manifest.json").read_text())
    del manifest["embed_precision"]  # as written by Docent before this setting existed
    (version / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING):
        retriever = Retriever(settings.with_overrides(embed_precision="int8"), embedder=embedder)
    try:
        assert retriever.query_embedder() is embedder
        assert "queries follow the index" in caplog.text
        hits = retriever.search("When does the bakery open?", k=1, mode="dense")
        assert hits[0].source == "bakery.md"
    finally:
        retriever.close()


def test_a_bf16_index_on_a_cpu_without_bf16_says_how_to_get_speed_back(
    tmp_path, embedder, caplog, monkeypatch
):
    corpus = write_corpus(tmp_path / "docs", DOCS)
    settings = DocentSettings(workspace=tmp_path / "ws", embed_precision="bf16")
    refresh_index([corpus], settings, embedder=embedder)
    auto = settings.with_overrides(embed_precision="auto")
    # The index moves to a machine without bf16 instructions (the AVX2 kind); this one
    # can't become that CPU, so the flag check is what is replaced.
    monkeypatch.setattr(embed_precision, "cpu_has_bf16", lambda: False)
    with caplog.at_level(logging.WARNING):
        retriever = Retriever(auto, embedder=embedder)
    try:
        assert retriever.query_embedder().precision == "bf16"  # still right, only slow
        assert "no bf16 instructions" in caplog.text and "--rebuild" in caplog.text
    finally:
        retriever.close()
    caplog.clear()
    (corpus / "museum.md").write_text("# Museum\n\nThe Tidewater museum shuts on Tuesdays.\n")
    with caplog.at_level(logging.WARNING):
        report = refresh_index([corpus], auto, embedder=embedder)
    assert report.published and report.embedded == 1
    assert "no bf16 instructions" in caplog.text
    live = open_store(auto)
    assert live.manifest["embed_precision"] == "bf16"
    live.close()
    # on a CPU with the instructions, nothing to say
    monkeypatch.setattr(embed_precision, "cpu_has_bf16", lambda: True)
    assert embed_precision.slow_here("bf16", "cpu") is None
    assert embed_precision.slow_here("fp32", "cpu") is None
