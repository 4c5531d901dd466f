"""Predictors trained on a tiny random model's own activations, and the policy that uses them."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from m2cache.formats.shares import DEFAULT_POLICY, Shares
from m2cache.model.predictor import PredictorPolicy
from m2cache.engine.policies import load_policy
from m2cache.storage.reader import Store
from m2cache.offline.train import PRESET_DEFAULT, register_predictors, train_predictors

# the default policy keeps 70% of neurons (random choice: recall 0.70) and 20% at FP16 (random: 0.20);
# on the tiny model the predictors reach about 0.80 and 0.65
MIN_RECALL_KEPT = 0.75
MIN_RECALL_FP16 = 0.45


@pytest.fixture(scope="module")
def trained(tiny_models, tmp_path_factory) -> tuple[Path, object]:
    """A private copy of the tiny store (the shared one stays without predictors), trained."""
    store = tmp_path_factory.mktemp("pred") / "store"
    shutil.copytree(tiny_models["silu"].store, store)
    report = train_predictors(store, tokens=2048, progress=False)
    return store, report


def test_trained_predictors_recall_the_true_top_neurons(trained) -> None:
    _, report = trained
    assert len(report.recall) == 3
    assert sum(report.recall) / 3 >= MIN_RECALL_KEPT
    assert sum(report.recall_fp16) / 3 >= MIN_RECALL_FP16


def test_training_registers_predictors_and_preset_policies(trained) -> None:
    store_dir, _ = trained
    store = Store(store_dir)
    assert (store_dir / store.manifest["predictors"]["path"]).is_file()
    assert store.manifest["default_policy"] == DEFAULT_POLICY  # convert's: training leaves it as it is
    kinds = {name: spec["kind"] for name, spec in store.manifest["policies"].items()}
    assert kinds.pop("gate-40") == kinds.pop("gate-25") == "gate"
    assert set(kinds.values()) == {"predictor"}


def test_the_stored_gate_policy_loads_as_a_gate_policy(trained) -> None:
    from m2cache.model.policy import GatePolicy

    pol = load_policy(Store(trained[0]), "gate-40", torch.float32)
    assert isinstance(pol, GatePolicy) and pol.needs_scores and pol.name == "gate-40"
    assert pol.counts(0) == {"fp16": 13, "int8": 26, "int4": 89}  # 0.1 / 0.2 / 0.7 of 128 neurons, rounded


def test_stored_policy_loads_and_scores_the_last_position(trained) -> None:
    store_dir, _ = trained
    store = Store(store_dir)
    pol = load_policy(store, PRESET_DEFAULT, torch.float32)
    assert isinstance(pol, PredictorPolicy) and pol.needs_scores
    h = torch.randn(4, store.config.hidden_size)
    s = pol.score(1, h)
    assert s.shape == (store.config.intermediate_size,)
    assert torch.allclose(s, pol.predictors.score_all(1, h)[-1], rtol=1e-5, atol=1e-5)


def test_ad_hoc_predictor_shares_load(trained) -> None:
    store_dir, _ = trained
    pol = load_policy(Store(store_dir), "predictor:0.25,0.25,0", torch.float32)
    assert pol.counts(0) == {"fp16": 32, "int8": 32, "int4": 0}


def test_per_layer_shares_are_accepted(trained) -> None:
    store_dir, _ = trained
    store = Store(store_dir)
    spec = {"shares": [Shares(0.5, 0, 0).to_dict(), Shares(0.2, 0.2, 0).to_dict(), Shares().to_dict()]}
    pol = PredictorPolicy.from_store(store, "layered", spec, torch.float32)
    assert [sum(pol.counts(L).values()) for L in range(3)] == [64, 52, 128]


def test_a_store_without_predictors_says_to_train_them(tiny_models, tmp_path) -> None:
    from m2cache.errors import PredictorMissingError

    store = tmp_path / "store"
    shutil.copytree(tiny_models["silu"].store, store)
    s = Store(store)
    register_predictors(s, rank=8)  # manifest names predictors that were never written
    with pytest.raises(PredictorMissingError, match="train-predictor"):
        load_policy(Store(store), "mixed-40", torch.float32)
