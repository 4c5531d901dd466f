"""``m2cache grow``: a model K times wider that computes the source's function, and the pieces it stands on
(the streamed safetensors writer, the layer-by-layer perplexity that measures models bigger than memory)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from m2cache.engine.loading import load_dense
from m2cache.errors import ConfigError
from m2cache.offline.grow import grow, grown_config, grown_from, proportions
from m2cache.offline.layerwise import layerwise_perplexity
from m2cache.formats import quant
from m2cache.storage.reader import PlainBackend, Store
from m2cache.storage.safetensors_stream import write_streamed

WIDTH = 4  # hidden 64 -> 256, a multiple of 256 as --width requires


@pytest.fixture(scope="module")
def grown(tiny_store, tmp_path_factory):
    return grow(tiny_store.store, tmp_path_factory.mktemp("grown") / "x4", WIDTH, progress=False)


def test_the_grown_model_computes_the_source_models_logits(tiny_store, grown):
    src, big = load_dense(Store(tiny_store.store)), load_dense(Store(grown["store"]))
    assert big.cfg.hidden_size == WIDTH * src.cfg.hidden_size and not big.cfg.tie_word_embeddings
    ids = list(range(3, 60))
    a = src.forward(ids, src.new_cache(), all_logits=True)
    b = big.forward(ids, big.new_cache(), all_logits=True)
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    assert torch.equal(a.argmax(1), b.argmax(1))


def test_transformers_reads_the_grown_hf_folder_as_the_same_model(grown):
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(grown["hf"], dtype=torch.float32)
    ours = load_dense(Store(grown["store"]))
    ids = list(range(3, 40))
    with torch.inference_mode():
        want = hf(torch.tensor([ids])).logits[0]
    assert torch.allclose(ours.forward(ids, ours.new_cache(), all_logits=True), want, atol=1e-4, rtol=1e-4)


def test_a_grown_neuron_is_quantised_exactly_as_its_source(tiny_store, grown):
    """Tiled rows fall on whole groups: the grown INT8 and INT4 bundles hold the source's codes, tiled."""
    src, big = Store(tiny_store.store), Store(grown["store"])
    for p in ("int8", "int4"):
        a = src.decode(p, src.read_layer(0, p, PlainBackend()), torch.float32)  # [F, 3, D]
        b = big.decode(p, big.read_layer(0, p, PlainBackend()), torch.float32)
        assert torch.equal(b, a.repeat(1, 1, WIDTH)), p


def test_no_neuron_is_duplicated(tiny_store, grown):
    assert Store(grown["store"]).num_neurons == Store(tiny_store.store).num_neurons


def test_grow_refuses_a_width_that_is_not_a_power_of_two(tiny_store, tmp_path):
    with pytest.raises(ConfigError, match="power of two"):
        grow(tiny_store.store, tmp_path / "g", 3, progress=False)
    with pytest.raises(ConfigError, match="multiple of 256"):
        grown_config(Store(tiny_store.store).config, 2)


def test_grow_refuses_a_split_store(tiny_store, tmp_path):
    from old_layouts import write_version2, write_version2_split

    split = write_version2_split(write_version2(tiny_store.store, tmp_path / "v2"), tmp_path / "split")
    with pytest.raises(ConfigError, match="split store"):
        grow(split, tmp_path / "g", WIDTH, progress=False)


def test_a_grown_store_names_its_source_and_its_policies_measure_the_same_there(tiny_store, grown):
    """The bench measures a grown model's policies on its source: the same perplexity, policy by policy."""
    from m2cache.offline.layerwise import LayerwiseEval, variant
    from m2cache.offline.train import split_text, token_windows

    assert grown_from(Store(grown["store"])) == Path(tiny_store.store) and grown_from(Store(tiny_store.store)) is None
    windows = token_windows(Store(tiny_store.store), split_text(None)[1], 128, window=64)
    got = {}
    for which in (tiny_store.store, grown["store"]):
        runs = [variant(p, "full", torch.float32) for p in ("gate:0.1,0.2,0.7", "gate:0,0,1")]
        LayerwiseEval(Store(which), windows).run(runs)
        got[which] = [v.nll / v.count for v in runs]
    assert got[tiny_store.store] == pytest.approx(got[grown["store"]], rel=1e-4)


def test_proportions_add_up(grown):
    p = proportions(Store(grown["store"]).config)
    assert math.isclose(p["ffn_share"] + p["attention_share"] + p["embeddings_and_head_share"], 1.0)


def test_a_streamed_safetensors_file_reads_back_with_safe_open(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int8),
               "c": torch.randn(2, 2).to(torch.bfloat16), "d": torch.randn(4).half()}
    specs = {n: (tuple(t.shape), t.dtype) for n, t in tensors.items()}
    write_streamed(tmp_path / "x.safetensors", specs, tensors.__getitem__)
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == sorted(tensors)
        for n, t in tensors.items():
            assert torch.equal(f.get_tensor(n), t)


def test_a_streamed_tensor_that_disagrees_with_its_header_is_a_bug(tmp_path):
    with pytest.raises(RuntimeError, match="header says"):
        write_streamed(tmp_path / "x.safetensors", {"a": ((2, 2), torch.float32)}, lambda n: torch.zeros(3))


def test_layerwise_perplexity_equals_the_whole_model_evaluator(tiny_store):
    """The layer-by-layer pass (memory bounded by a layer) measures what ``m2cache eval`` measures."""
    from m2cache.offline.evaluate import QualityModel, perplexity
    from m2cache.offline.train import split_text, token_windows

    store = Store(tiny_store.store)
    windows = token_windows(store, split_text(None)[1], 256, window=64)
    qm = QualityModel(store)
    names = ["gate:0.25,0.25,0.25", "gate-split:0.25,0.25,0.25", "oracle:0.5,0,0"]
    rows = layerwise_perplexity(store.path, [(n, "full", torch.float32) for n in names], windows)
    dense, _ = perplexity(qm, windows, qm.policy("dense-fp16"))
    for name, row in zip(names, rows):
        want, _ = perplexity(qm, windows, qm.policy(name))
        assert row["dense_ppl"] == pytest.approx(dense, rel=1e-4)
        assert row["ppl"] == pytest.approx(want, rel=1e-3), name


def test_layerwise_perplexity_of_the_grown_model_is_the_sources(tiny_store, grown):
    from m2cache.offline.train import split_text, token_windows

    windows = token_windows(Store(tiny_store.store), split_text(None)[1], 128, window=64)
    variants = [("gate:0.25,0.25,0.25", "full", torch.float32), ("dense-fp16", "int8", torch.float32)]
    a = layerwise_perplexity(tiny_store.store, variants, windows)
    b = layerwise_perplexity(grown["store"], variants, windows)
    for x, y in zip(a, b):
        assert y["ppl"] == pytest.approx(x["ppl"], rel=1e-3)
        assert y["dense_ppl"] == pytest.approx(x["dense_ppl"], rel=1e-4)


def test_a_grown_models_locality_is_its_sources(tiny_store, grown):
    """The same function ranks the same neurons: the overlap and hot-set figures are the source's; only the
    reads depend on the (longer) bundles."""
    from m2cache.offline.locality import locality

    a = locality(tiny_store.store, tokens=256, window=64)
    b = locality(grown["store"], tokens=256, window=64)
    for key in ("top10_prev", "top10_last4", "top30_prev", "top30_last4", "hot80"):
        assert 0.0 <= a["mean"][key] <= 1.0
        assert b["mean"][key] == pytest.approx(a["mean"][key], abs=0.02), key
    assert a["mean"]["top10_last4"] >= a["mean"]["top10_prev"]
    assert b["mean"]["runs_fp16"] >= 1 and b["mean"]["kb_per_run_fp16"] > 0


def test_a_cache_that_holds_the_current_token_changes_no_precision():
    from m2cache.offline.layerwise import cached_only

    g = torch.Generator().manual_seed(0)
    order = torch.rand(2 * 16, 40, generator=g).argsort(1)
    masks = {"fp16": (order < 4).float(), "int8": ((order >= 4) & (order < 12)).float(), "int4": (order >= 12).float()}
    same = cached_only(masks, 16, 1, delay=0)  # the token's own bundles, fetched before it computes
    assert all(torch.equal(same[p], masks[p]) for p in masks)
    longer = cached_only(masks, 16, 16, delay=0)  # an INT8 neuron that a recent token had at FP16 runs at FP16
    assert torch.equal(longer["fp16"] * masks["fp16"], masks["fp16"]) and longer["fp16"].sum() >= masks["fp16"].sum()
    late = cached_only(masks, 16, 1, delay=1)  # only the previous token's bundles: the first token runs all INT4
    assert late["int4"][0].sum() == 40 and late["int4"][16].sum() == 40
    assert sum(m.sum() for m in late.values()) == 32 * 40  # every neuron still runs, at one precision
