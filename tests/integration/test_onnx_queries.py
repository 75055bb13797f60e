"""Questions through the ONNX export of the packaged model: same vectors as torch, cached."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from store.embeddings import PymilvusEmbeddings, packaged_minilm_path
from store.onnx_queries import MIN_COSINE_INT8, cache_path, int8_path, load_or_export, supported

pytestmark = pytest.mark.integration

QUESTIONS = [
    "How is data stored in milvus?",
    "Can I run Milvus on Windows?",
    "what happens when the etcd pod is pending " * 40,  # longer than the model's 256 tokens
]


def transformer_of(embeddings: Any) -> Any:
    return embeddings.function.model[0].auto_model


def test_export_matches_torch_and_is_reused(tmp_path: Path, embeddings: Any) -> None:
    model_dir = packaged_minilm_path()
    encoder = load_or_export(
        model_dir, tmp_path, lambda: transformer_of(embeddings), embeddings.function.encode_queries
    )
    assert encoder is not None
    assert cache_path(model_dir, tmp_path).is_file()
    ours = np.asarray(encoder.encode_queries(QUESTIONS))
    theirs = np.asarray(embeddings.function.encode_queries(QUESTIONS))
    assert ours.shape == (3, 384)
    assert (ours * theirs).sum(axis=1).min() > 0.9999

    def no_export() -> Any:
        raise AssertionError("exported again instead of reading the cache")

    again = load_or_export(model_dir, tmp_path, no_export, embeddings.function.encode_queries)
    assert again is not None
    assert np.allclose(again.encode_queries(QUESTIONS[:1]), ours[:1], atol=1e-6)


def test_int8_copy_is_close_to_torch_and_is_reused(tmp_path: Path, embeddings: Any) -> None:
    model_dir = packaged_minilm_path()
    encoder = load_or_export(
        model_dir, tmp_path, lambda: transformer_of(embeddings), embeddings.function.encode_queries, int8=True
    )
    assert encoder is not None and encoder.int8
    exact_file = cache_path(model_dir, tmp_path)
    assert int8_path(exact_file).is_file()
    import onnx

    ops = {node.op_type for node in onnx.load(str(int8_path(exact_file))).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops  # the layers really run in int8
    ours = np.asarray(encoder.encode_queries(QUESTIONS))
    theirs = np.asarray(embeddings.function.encode_queries(QUESTIONS))
    cosines = (ours * theirs).sum(axis=1)
    assert cosines.min() >= MIN_COSINE_INT8
    assert cosines.max() < 0.9999  # really the int8 weights, not the fp32 export

    def no_export() -> Any:
        raise AssertionError("exported again instead of reading the cache")

    def no_reference(texts: list[str]) -> Any:
        raise AssertionError("checked against torch again instead of trusting the cached copy")

    exact_file.unlink()  # a cached int8 copy is all a later start opens
    again = load_or_export(model_dir, tmp_path, no_export, no_reference, int8=True)
    assert again is not None and again.int8
    # Each question's vector is its own, whatever it was batched with.
    assert np.allclose(again.encode_queries(QUESTIONS[:1]), ours[:1], atol=1e-6)
    assert np.allclose(again.encode_queries(QUESTIONS[::-1])[::-1], ours, atol=1e-6)


def test_an_int8_copy_that_disagrees_falls_back_to_the_exact_export(tmp_path: Path, embeddings: Any) -> None:
    model_dir = packaged_minilm_path()
    assert load_or_export(
        model_dir, tmp_path, lambda: transformer_of(embeddings), embeddings.function.encode_queries
    )
    exact_file = cache_path(model_dir, tmp_path)

    def wrong(texts: list[str]) -> Any:
        # The fp32 export is cached and trusted: only the new int8 copy is checked.
        return np.ones((len(texts), 384))

    encoder = load_or_export(model_dir, tmp_path, lambda: transformer_of(embeddings), wrong, int8=True)
    assert encoder is not None and not encoder.int8
    assert not int8_path(exact_file).exists()


def test_the_cache_is_named_after_the_weights_not_their_folder(tmp_path: Path) -> None:
    # A fresh install (a new venv) must find the export that an earlier install made.
    model_dir = packaged_minilm_path()
    copy = tmp_path / "elsewhere" / model_dir.name
    shutil.copytree(model_dir, copy)
    assert cache_path(copy, tmp_path) == cache_path(model_dir, tmp_path)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert cache_path(copy, tmp_path) != cache_path(model_dir, tmp_path)


def test_an_export_that_disagrees_is_thrown_away(tmp_path: Path, embeddings: Any) -> None:
    def wrong(texts: list[str]) -> Any:
        return np.ones((len(texts), 384))

    model_dir = packaged_minilm_path()
    assert load_or_export(model_dir, tmp_path, lambda: transformer_of(embeddings), wrong) is None
    assert not cache_path(model_dir, tmp_path).exists()


def test_models_pooled_otherwise_stay_on_torch(tmp_path: Path) -> None:
    copy = tmp_path / "cls-model"
    shutil.copytree(packaged_minilm_path(), copy, ignore=shutil.ignore_patterns("*.safetensors"))
    pooling = copy / "1_Pooling" / "config.json"
    config = json.loads(pooling.read_text())
    config.update(pooling_mode_mean_tokens=False, pooling_mode_cls_token=True)
    pooling.write_text(json.dumps(config))
    assert supported(packaged_minilm_path())
    assert not supported(copy)


def test_embeddings_use_onnx_for_questions_and_skip_torch_when_cached(
    tmp_path: Path, embeddings: Any
) -> None:
    first = PymilvusEmbeddings("minilm", onnx_cache_dir=tmp_path)
    first._function = embeddings.function  # the session's loaded torch model, for the export
    try:
        vector = first.embed_query(QUESTIONS[0])
        assert first.query_backend == "onnx"
    finally:
        first.close()
    cached = PymilvusEmbeddings("minilm", onnx_cache_dir=tmp_path)
    try:
        again = cached.embed_query(QUESTIONS[0])
        assert cached.query_backend == "onnx"
        assert not cached.loaded  # questions alone never load torch once the export exists
    finally:
        cached.close()
    assert np.dot(vector, again) > 0.9999
    assert np.dot(vector, embeddings.embed_query(QUESTIONS[0])) > 0.9999


def test_settings_choose_the_exact_export_by_default(tmp_path: Path, embeddings: Any) -> None:
    from settings import Settings
    from store.embeddings import make_embeddings

    for encoder, backend in (("onnx-int8", "onnx-int8"), ("onnx", "onnx"), ("torch", "torch")):
        values: dict[str, Any] = {"RAG_CACHE_DIR": str(tmp_path)}
        if encoder != "onnx":  # the default
            values["RAG_QUERY_ENCODER"] = encoder
        model = make_embeddings(Settings(_env_file=None, **values))
        model._function = embeddings.function  # the session's loaded torch model, for the export
        try:
            vector = model.embed_query(QUESTIONS[0])
            assert model.query_backend == backend
        finally:
            model.close()
        assert np.dot(vector, embeddings.embed_query(QUESTIONS[0])) > MIN_COSINE_INT8
