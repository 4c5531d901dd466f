"""Quality evaluation on a tiny store: dense-fp16 reproduces the dense model, and the batched
teacher-forced pass computes what per-token sparse decoding computes."""
from __future__ import annotations

import shutil

import pytest
import torch

from m2cache.offline.evaluate import QualityModel, evaluate
from m2cache.storage.reader import Store
from m2cache.offline.train import train_predictors
from m2cache.offline.tune import tune


@pytest.fixture(scope="module")
def store_dir(tiny_models, tmp_path_factory):
    store = tmp_path_factory.mktemp("eval") / "store"
    shutil.copytree(tiny_models["silu"].store, store)
    train_predictors(store, tokens=1024, progress=False, epochs=1)
    return store


@pytest.fixture(scope="module")
def rows(store_dir):
    return evaluate(store_dir, ["dense-fp16", "oracle:0.1,0.2,0.2", "predictor:0.5,0,0", "mixed-40"],
                    tokens=1024, greedy_tokens=12, prompts=["Hello there", "What is a list?"])


def test_dense_fp16_equals_the_dense_fp32_model(rows) -> None:
    dense = rows[0]
    assert dense["policy"] == "dense-fp16"
    assert dense["agreement"] == 1.0
    assert dense["top1"] == 1.0
    assert abs(dense["ppl"] / dense["dense_ppl"] - 1) < 1e-4
    assert dense["ffn_bytes_ratio"] == 1.0


def test_every_policy_reports_bytes_and_quality(rows) -> None:
    by = {r["policy"]: r for r in rows}
    assert by["oracle:0.1,0.2,0.2"]["ffn_bytes_ratio"] < 0.3
    assert by["predictor:0.5,0,0"]["ffn_bytes_ratio"] == pytest.approx(0.5)
    for r in rows:
        assert r["ppl"] > 1 and 0 <= r["agreement"] <= 1
    assert 0 < by["predictor:0.5,0,0"]["recall"] <= 1


def test_batched_masks_equal_token_by_token_sparse_decoding(store_dir) -> None:
    qm = QualityModel(Store(store_dir))
    pol = qm.policy("oracle:0.2,0.3,0.2")
    window = list(range(5, 29))
    batched = qm.logits(window, pol)
    kv = qm.dense.new_cache()
    stepped = torch.stack([qm.sparse_step(t, kv, pol) for t in window])
    assert torch.allclose(batched, stepped, rtol=1e-4, atol=1e-4)


def test_tune_spends_the_budget_and_becomes_the_default(store_dir) -> None:
    report = tune(store_dir, 0.4, tokens=512, progress=False)
    assert report.bytes_ratio <= 0.4 + 1e-9
    assert report.bytes_ratio > 0.3  # INT4 fills what FP16 and INT8 leave
    store = Store(store_dir)
    assert store.manifest["default_policy"] == report.name
    assert store.manifest["policies"][report.name]["shares"] == report.shares.to_dict()
