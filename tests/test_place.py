"""``m2cache place``: each layer's neurons laid out most chosen first; the same model, fewer reads a token."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from m2cache.engine.loading import load_dense
from m2cache.errors import ConfigError
from m2cache.formats import quant
from m2cache.offline.place import neuron_counts, orders_from, place
from m2cache.storage.reader import PlainBackend, Store


@pytest.fixture(scope="module")
def placed(tiny_store, tmp_path_factory):
    return place(tiny_store.store, tmp_path_factory.mktemp("placed") / "store", tokens=64, progress=False)


def test_the_placed_model_computes_the_same_logits(tiny_store, placed):
    src, out = load_dense(Store(tiny_store.store)), load_dense(Store(placed))
    ids = list(range(3, 60))
    a = src.forward(ids, src.new_cache(), all_logits=True)
    b = out.forward(ids, out.new_cache(), all_logits=True)
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)  # the FFN's sum in another order
    assert torch.equal(a.argmax(1), b.argmax(1))


def test_each_layer_holds_the_sources_neurons_most_chosen_first(tiny_store, placed):
    source, store = Store(tiny_store.store), Store(placed)
    counts = neuron_counts(source, tokens=64)
    orders = orders_from(counts)
    for layer in range(source.config.num_layers):
        assert sorted(orders[layer].tolist()) == list(range(source.num_neurons))  # a permutation
        assert (np.diff(counts[layer][orders[layer]]) <= 0).all()  # most chosen first
        for p in quant.PRECISIONS:  # every precision's bundles moved alike, bytes unchanged
            a = source.read_layer(layer, p, PlainBackend())
            b = store.read_layer(layer, p, PlainBackend())
            assert torch.equal(b, a[torch.from_numpy(orders[layer])])
    m = store.manifest
    assert m["placement"]["tokens"] == 64 and m["source"] == source.manifest["source"]
    assert m.get("default_policy") == source.manifest.get("default_policy")


def test_place_refuses_to_overwrite_its_source(tiny_store):
    with pytest.raises(ConfigError, match="other than STORE"):
        place(tiny_store.store, tiny_store.store, tokens=16, progress=False)


def test_the_bench_places_its_model_once_in_the_same_folder(tiny_store, tmp_path, monkeypatch):
    import shutil

    from m2cache.bench import model

    monkeypatch.setattr(model, "PLACE_TOKENS", 64)
    store = tmp_path / "store"
    shutil.copytree(tiny_store.store, store)
    model.ensure_placed(store, tmp_path)
    first = Store(store).manifest["placement"]
    assert first["tokens"] == 64 and sorted(p.name for p in tmp_path.iterdir()) == ["grown.json", "store"]
    model.ensure_placed(store, tmp_path)  # already placed: nothing written
    assert Store(store).manifest["placement"] == first
