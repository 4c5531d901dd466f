"""Quality evaluation on a tiny store: dense-fp16 reproduces the dense model, and the batched
teacher-forced pass computes what per-token sparse decoding computes."""
from __future__ import annotations

import math
import shutil

import pytest
import torch

from m2cache.errors import ConfigError
from m2cache.offline.evaluate import QualityModel, evaluate
from m2cache.offline.frontier import frontier_policies
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
    return evaluate(store_dir, ["dense-fp16", "oracle:0.1,0.2,0.2", "predictor:0.5,0,0", "mixed-40", "gate:0.5,0,0",
                                "gate-split:0.5,0,0", "gate-40"],
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


# On the tiny random model (3 layers, 256 neurons, 1024 held-out tokens) half the neurons chosen at
# random keep half of the true top half (ranked by contribution); measured: the trained predictor 0.63,
# the gate 0.73 (it sees the true gate product and only guesses the up product from its row's norm).
MIN_GATE_RECALL = 0.68
MIN_PREDICTOR_RECALL = 0.58


def test_selection_recall_of_the_true_top_half(rows) -> None:
    by = {r["policy"]: r for r in rows}
    assert by["gate:0.5,0,0"]["recall"] >= MIN_GATE_RECALL
    assert by["predictor:0.5,0,0"]["recall"] >= MIN_PREDICTOR_RECALL
    assert by["gate:0.5,0,0"]["recall"] > by["predictor:0.5,0,0"]["recall"]


def test_rows_report_the_greedy_run_and_the_selection_bytes(rows, store_dir) -> None:
    by = {r["policy"]: r for r in rows}
    assert by["dense-fp16"]["greedy_median"] == 12 and by["dense-fp16"]["selector_bytes_ratio"] == 0
    assert 0 <= by["gate:0.5,0,0"]["greedy_median"] <= 12
    # the gate's INT4 copy (one part of three of an INT4 bundle) and a float32 norm, every neuron, every layer
    store = Store(store_dir)
    per_gate = (store.bundle_bytes("int4") / 3 + 4) / store.bundle_bytes("fp16")
    assert by["gate:0.5,0,0"]["selector_bytes_ratio"] == pytest.approx(per_gate)
    assert by["mixed-40"]["selector_bytes_ratio"] > 0  # the predictors (on the tiny model, as big as its FFN)


def test_frontier_names_each_method_at_each_share() -> None:
    names = frontier_policies(["predictor", "oracle"], ((0.1, 0.2, 0.7), (0.0, 0.2, 0.55)))
    assert names == ["predictor:0.1,0.2,0.7", "predictor:0,0.2,0.55", "oracle:0.1,0.2,0.7", "oracle:0,0.2,0.55"]
    with pytest.raises(ConfigError, match="unknown selection method"):
        frontier_policies(["magic"])


def test_a_gate_policy_is_measured_as_the_engine_runs_it_fetching_two_thirds(rows) -> None:
    # a store of format 3 keeps its gate rows apart: every gate policy fetches up and down only and takes
    # the kept neurons' gates from the resident INT4 copy, which gate-split:A,B,C measures on any store
    by = {r["policy"]: r for r in rows}
    split, gate = by["gate-split:0.5,0,0"], by["gate:0.5,0,0"]
    assert gate["ffn_bytes_ratio"] == split["ffn_bytes_ratio"] == pytest.approx(
        by["predictor:0.5,0,0"]["ffn_bytes_ratio"] * 2 / 3)
    assert (gate["ppl"], gate["top1"], gate["recall"]) == (split["ppl"], split["top1"], split["recall"])
    assert split["recall"] >= MIN_GATE_RECALL
    assert by["gate-40"]["kept"] == 1.0
    assert by["gate-40"]["ffn_bytes_ratio"] == pytest.approx(by["mixed-40"]["ffn_bytes_ratio"] * 2 / 3)


def test_the_split_gate_layout_computes_with_the_int4_gate_rows(store_dir, tmp_path) -> None:
    from old_layouts import write_version2

    qm = QualityModel(Store(store_dir))
    split = qm.weights_for(qm.policy("gate-split:0.1,0.2,0.7"))
    for p in ("fp16", "int8"):
        assert torch.equal(split[p][1][:, 0], qm.weights["int4"][1][:, 0])
        assert torch.equal(split[p][1][:, 1:], qm.weights[p][1][:, 1:])
    assert qm.weights_for(qm.policy("gate:0.1,0.2,0.7")) is split
    # a store of format 2 fetches each kept neuron's gate with its bundle, at its precision
    old = QualityModel(Store(write_version2(store_dir, tmp_path / "v2")))
    assert old.weights_for(old.policy("gate:0.1,0.2,0.7")) is old.weights


def test_the_engine_refuses_the_split_gate_layout_it_does_not_have(store_dir) -> None:
    from m2cache.engine.policies import load_policy

    with pytest.raises(ConfigError, match="m2cache eval. only"):
        load_policy(Store(store_dir), "gate-split:0.1,0.2,0.7", torch.float32)


def _linear_ppl(sensitivity: list[float], base):
    """A calibration ppl that grows with each layer's INT4 share by that layer's sensitivity."""
    return lambda layers: 10 + sum(s * (x.int4 - base.int4) for s, x in zip(sensitivity, layers))


def test_per_layer_tune_pays_for_the_sensitive_layers_with_the_insensitive_ones() -> None:
    from m2cache.formats.shares import Shares
    from m2cache.offline.tune import tune_layers

    base = Shares(0.1, 0.2, 0.7)
    layers, ppl = tune_layers(4, base, 10.0, _linear_ppl([0.1, 5.0, 0.2, 3.0], base), progress=False)
    assert layers is not None and ppl < 10
    assert [x.int4 for x in layers] == pytest.approx([0.8, 0.6, 0.8, 0.6])  # 0, 2 pay for 1, 3
    assert sum(x.int8 for x in layers) == pytest.approx(4 * base.int8)  # the same bytes
    # layers that all weigh the same: nothing to exchange, the global shares stay
    assert tune_layers(3, base, 10.0, _linear_ppl([1.0, 1.0, 1.0], base), progress=False) == (None, 10.0)


def test_tune_per_layer_with_the_gate_saves_a_gate_policy(store_dir) -> None:
    from m2cache.engine.policies import load_policy
    from m2cache.model.policy import GatePolicy

    report = tune(store_dir, 0.4, tokens=512, progress=False, set_default=False, per_layer=True, kind="gate",
                  name="tuned-gate")
    spec = Store(store_dir).manifest["policies"]["tuned-gate"]
    assert spec["kind"] == "gate"
    assert report.calib_ppl <= report.global_ppl
    if report.layers is not None:  # a list of per-layer shares, the same bytes on average as the global
        assert len(spec["shares"]) == 3
        assert sum(s["int8"] for s in spec["shares"]) == pytest.approx(3 * report.shares.int8)
    assert isinstance(load_policy(Store(store_dir), "tuned-gate", torch.float32), GatePolicy)
    with pytest.raises(ConfigError, match="predictor or gate"):
        tune(store_dir, 0.4, kind="oracle", progress=False)


def test_tune_by_entropy_minimises_the_mean_entropy_and_reports_perplexity(store_dir) -> None:
    from m2cache.offline.evaluate import QualityModel, mean_entropy
    from m2cache.offline.train import split_text, token_windows

    store = Store(store_dir)
    qm = QualityModel(store)
    report = tune(store_dir, 0.3, tokens=512, progress=False, set_default=False, objective="entropy",
                  name="by-entropy", qm=qm)
    assert report.objective == "entropy" and "searched by entropy" in report.summary()
    entropies = {s: v for s, _, v in report.tried}
    assert entropies[report.shares] == min(entropies.values())
    windows = token_windows(store, split_text(None)[0], 512)
    dense = mean_entropy(qm, windows, qm.policy("dense-fp16"))
    assert 0 < dense < math.log(store.config.vocab_size)  # nats, below the uniform distribution's
    assert report.calib_ppl > 1  # the chosen shares' perplexity, measured once
    with pytest.raises(ConfigError, match="ppl or entropy"):
        tune(store_dir, 0.3, objective="loss", progress=False, qm=qm)


def test_lookahead_is_measured_as_the_engine_ranks_it(store_dir) -> None:
    # NAME@ahead ranks layer L from layer L-1's residual after its attention (EngineConfig.lookahead); the
    # teacher-forced pass and token-by-token decoding agree on it, and it changes what is kept
    qm = QualityModel(Store(store_dir))
    ahead, in_turn = qm.policy("oracle:0.2,0.3,0.2@ahead"), qm.policy("oracle:0.2,0.3,0.2")
    assert ahead.lookahead and not in_turn.lookahead
    window = list(range(5, 29))
    batched = qm.logits(window, ahead)
    kv = qm.dense.new_cache()
    stepped = torch.stack([qm.sparse_step(t, kv, ahead) for t in window])
    assert torch.allclose(batched, stepped, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(batched, qm.logits(window, in_turn), rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError, match="only a policy that scores neurons can look ahead"):
        qm.policy("dense-fp16@ahead")


def test_fewer_tokens_than_a_window_is_refused_saying_the_least_that_works(store_dir) -> None:
    from m2cache.offline.train import split_text, token_windows

    with pytest.raises(ConfigError, match="ask for at least 512 tokens"):
        token_windows(Store(store_dir), split_text(None)[1], 256, window=512)
    assert len(token_windows(Store(store_dir), split_text(None)[1], 256, window=256)) == 1
