"""The C kernels: the sparse FFN's (each precision, activation and token count agrees with the dequantised FP32
reference; rows are read by slot, in any order; bad slots are refused; the engine decodes the same tokens with and
without them), the decode attention block's (against torch's operators, float32, bfloat16 and INT8 weights), and
their thread pool (shared products equal one thread's; a product right after a resize)."""
from __future__ import annotations

import asyncio

import pytest
import torch

from m2cache import Engine, EngineConfig
from m2cache.model import cpu_build, cpu_kernels, kernel_reference
from m2cache.model.llama import activation
from m2cache.model.sparse_ffn import ffn_groups
from m2cache.formats import quant

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no C compiler: the torch path serves")

# FP32 sums in another order than torch's: a few ulps per product, ~1e-6 relative on the output
RTOL = 1e-4


def G(group: int) -> quant.Groups:
    """INT8 and INT4 both in groups of ``group`` values."""
    return quant.Groups(int8=group, int4=group)


def pool_of(precision: str, n: int, dim: int, group: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.randn(n, 3, dim, generator=torch.Generator().manual_seed(seed)) * 0.05
    return w, quant.encode(precision, w, G(group))


def reference(precision: str, pool: torch.Tensor, slots: torch.Tensor, h: torch.Tensor, dim: int, group: int,
              act: str) -> torch.Tensor:
    """The rows' FFN as the kernels round it (``kernel_reference.ffn``: INT8 activations for INT8/INT4 rows while
    they are on, INT4 down columns in blocks where the kernels add them so), in torch."""
    return kernel_reference.ffn(h, precision, pool[slots], 3, dim, G(group), activation(act))


@pytest.fixture(params=["int8", "float32"])
def acts(request):
    """The kernels' activations for the test: INT8 in blocks of 32 (the default) or float32; restored after."""
    before = cpu_kernels.set_int8_activations(request.param == "int8")
    yield request.param
    cpu_kernels.set_int8_activations(before)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("precision", quant.PRECISIONS)
@pytest.mark.parametrize("act", sorted(cpu_kernels.ACTIVATIONS))
@pytest.mark.parametrize("T", [1, 3])
def test_kernel_matches_the_dequantised_reference(acts, precision: str, act: str, T: int) -> None:
    dim, group = 128, 32
    _, pool = pool_of(precision, 200, dim, group)
    slots = torch.tensor([5, 199, 0, 17, 64, 63, 100])  # any order, first and last rows included
    h = torch.randn(T, dim, generator=torch.Generator().manual_seed(1))
    out = torch.zeros(T, dim)
    cpu_kernels.ffn_group(precision, pool, slots, h, out, dim, G(group), act)
    assert rel_err(out, reference(precision, pool, slots, h, dim, group, act)) < RTOL


@pytest.mark.parametrize("precision", quant.PRECISIONS)
def test_kernel_handles_widths_off_the_vector_length(acts, precision: str) -> None:
    dim, group = 40, 8  # 40 = 2 x 16 + 8 values; INT4 groups of 4 bytes: the scalar loops
    _, pool = pool_of(precision, 30, dim, group, seed=3)
    slots = torch.arange(30).flip(0).contiguous()
    h = torch.randn(2, dim, generator=torch.Generator().manual_seed(4))
    out = torch.zeros(2, dim)
    cpu_kernels.ffn_group(precision, pool, slots, h, out, dim, G(group), "silu")
    assert rel_err(out, reference(precision, pool, slots, h, dim, group, "silu")) < RTOL


@pytest.mark.parametrize(("dim", "group", "T"), [(128, 32, 1), (128, 32, 70), (40, 8, 3)])
def test_gate_kernel_scores_every_row_of_the_packed_int4_copy(acts, dim: int, group: int, T: int) -> None:
    # the gate policy's resident copy: the gate part of each INT4 bundle, scored without dequantising;
    # 70 tokens span two calls of 64
    _, bundles = pool_of("int4", 90, dim, group, seed=5)
    gates = cpu_kernels.gate_rows_int4(bundles, dim, group)
    assert gates.shape == (90, dim // 2 + 4 * dim // group)
    h = torch.randn(T, dim, generator=torch.Generator().manual_seed(6))
    got = cpu_kernels.gate_int4(gates, h, dim, group, "silu")
    gate_rows = quant.decode("int4", bundles, 3, dim, torch.float32, G(group))[:, 0]
    assert rel_err(got, activation("silu")(cpu_kernels.product_input(h, "int4", dim, G(group)) @ gate_rows.T)) < RTOL


@pytest.mark.parametrize("dim", [128, 40])
def test_int8_kernel_reads_one_scale_per_row_from_version_1_stores(acts, dim: int) -> None:
    # a format version 1 store's INT8 bundle is the same layout with a group as wide as the row
    _, pool = pool_of("int8", 50, dim, dim)
    slots = torch.tensor([3, 49, 0, 20])
    h = torch.randn(2, dim, generator=torch.Generator().manual_seed(2))
    out = torch.zeros(2, dim)
    cpu_kernels.ffn_group("int8", pool, slots, h, out, dim, G(dim), "silu")
    assert rel_err(out, reference("int8", pool, slots, h, dim, dim, "silu")) < RTOL


def test_kernel_adds_into_the_output(acts) -> None:
    dim, group = 64, 32
    _, pool = pool_of("int4", 10, dim, group)
    slots, h = torch.arange(10), torch.randn(1, dim)
    base = torch.randn(1, dim)
    out = base.clone()
    cpu_kernels.ffn_group("int4", pool, slots, h, out, dim, G(group), "silu")
    assert rel_err(out - base, reference("int4", pool, slots, h, dim, group, "silu")) < RTOL


def test_no_slots_leave_the_output_alone() -> None:
    _, pool = pool_of("int8", 4, 64, 32)
    out = torch.ones(1, 64)
    cpu_kernels.ffn_group("int8", pool, torch.zeros(0, dtype=torch.int64), torch.randn(1, 64), out, 64, G(32), "silu")
    assert torch.equal(out, torch.ones(1, 64))


@pytest.mark.parametrize("slot", [-1, 4])
def test_a_slot_outside_the_pool_is_refused_before_any_read(slot: int) -> None:
    _, pool = pool_of("fp16", 4, 64, 32)
    with pytest.raises(IndexError, match=r"\[0, 4\)"):
        cpu_kernels.ffn_group("fp16", pool, torch.tensor([0, slot]), torch.randn(1, 64), torch.zeros(1, 64), 64, G(32),
                              "silu")


def test_row_copy_writes_the_source_rows_into_the_pool_slots() -> None:
    src = torch.randint(0, 256, (6, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    pool = torch.zeros(8, 40, dtype=torch.uint8)
    dst, rows = torch.tensor([7, 0, 3]), torch.tensor([5, 1, 2])
    cpu_kernels.copy_rows(pool, dst, src, rows)
    expected = torch.zeros(8, 40, dtype=torch.uint8)
    expected[dst] = src[rows]
    assert torch.equal(pool, expected)


@pytest.mark.parametrize(("dst", "rows"), [([0, 8], [0, 1]), ([0, 1], [0, 6]), ([-1, 1], [0, 1])])
def test_row_copy_refuses_an_index_outside_either_tensor_before_any_copy(dst: list[int], rows: list[int]) -> None:
    src, pool = torch.ones(6, 40, dtype=torch.uint8), torch.zeros(8, 40, dtype=torch.uint8)
    with pytest.raises(IndexError, match="copy_rows"):
        cpu_kernels.copy_rows(pool, torch.tensor(dst), src, torch.tensor(rows))
    assert not pool.any()


async def decode(store, *, kernels: bool, preload: str, **config) -> tuple[list[float], Engine]:
    """12 tokens through the engine; with the kernels on, every FFN they compute is checked against the torch
    path over the same rows (its largest error relative to the output's largest value, one entry per layer call).

    Tokens are not compared: on a tiny random model a 1e-7 rounding difference moves a neuron across the
    oracle's cut or flips a near-tied argmax a few tokens later, so equal tokens would test luck."""
    cfg = EngineConfig(hbm_budget="1MB", dram_budget="1MB", policy="oracle:0.2,0.3,0.3", cpu_kernels=kernels,
                       preload=preload, **config)
    errors: list[float] = []
    async with asyncio.timeout(60):
        async with Engine.open(store, cfg) as engine:
            ex = engine.executor.ffn
            kernel_ffn = ex.compute

            def checked(h: torch.Tensor, ready, prefill: bool) -> torch.Tensor:
                out = kernel_ffn(h, ready, prefill)
                ref = ffn_groups(h, ex.raw_rows(ready), ex.parts, ex.dim, ex.groups, ex.act, ex.dtype) if not kernels \
                    else sum(kernel_reference.ffn(h, p, rows, ex.parts, ex.dim, ex.groups, ex.act)
                             for p, rows in ex.raw_rows(ready).items())
                errors.append(float((out - ref).abs().max() / ref.abs().max()))
                return out

            ex.compute = checked
            assert len([t async for t in engine.generate_ids([1, 2, 3, 4], 12)]) == 12
    return errors, engine


def same_as_torch(errors: list[float]) -> bool:
    return len(errors) >= 3 * 12 and max(errors) < kernel_reference.BOUNDARY_RTOL  # 3 layers, a prefill and 11 decode steps


async def test_engine_decodes_with_the_kernels_as_the_torch_path_does(tiny_store, _no_task_left_behind) -> None:
    errors, engine = await decode(tiny_store.store, kernels=True, preload="neuron")
    assert engine.executor.use_kernels and not engine.hbm.direct_from_dram  # the kernels over the pool
    assert same_as_torch(errors)  # the prompt's dense prefill (4 positions) through the kernels too
    ffn = engine.executor.ffn
    assert ffn.dense_prefill and ffn.kernels_for(4, True) and not ffn.kernels_for(cpu_kernels.MAX_TOKENS + 1, True)
    _, engine = await decode(tiny_store.store, kernels=False, preload="neuron")
    assert not engine.executor.use_kernels


async def test_with_whole_layers_in_dram_the_cpu_computes_from_there(tiny_store, _no_task_left_behind) -> None:
    errors, engine = await decode(tiny_store.store, kernels=True, preload="hybrid")
    assert engine.hbm.direct_from_dram
    assert engine.stats()["bytes"]["dram_to_hbm"] == 0  # nothing copied into the pool
    assert same_as_torch(errors)


async def test_with_compute_from_dram_off_the_cpu_copies_into_the_pool_as_cuda_does(tiny_store,
                                                                                    _no_task_left_behind) -> None:
    errors, engine = await decode(tiny_store.store, kernels=True, preload="hybrid", compute_from_dram=False)
    assert not engine.hbm.direct_from_dram and engine.hbm.uploader.row_copy
    assert engine.stats()["bytes"]["dram_to_hbm"] > 0
    assert same_as_torch(errors)


def test_the_gate_policy_keeps_its_int4_copy_packed_and_scores_from_it(tiny_store) -> None:
    from m2cache.engine.policies import gate_policy
    from m2cache.formats.shares import Shares
    from m2cache.storage.reader import PlainBackend, Store

    store = Store(tiny_store.store)
    policy = gate_policy(store, Shares(0.5, 0, 0), torch.float32)
    assert all(g.dtype == torch.uint8 for g in policy.gates)
    # the bytes it reports are the bytes it holds: the packed rows and a float32 norm a neuron
    assert sum(g.numel() for g in policy.gates) + 4 * sum(n.numel() for n in policy.norms) == policy.resident_bytes
    h = torch.randn(2, store.hidden, generator=torch.Generator().manual_seed(7))
    gate = store.decode("int4", store.read_layer(1, "int4", PlainBackend()), torch.float32)[:, 0]
    expected = activation("silu")(cpu_kernels.product_input(h, "int4", store.hidden, store.groups) @ gate.T).abs() \
        * policy.norms[1]
    assert rel_err(policy.score_all(1, h), expected) < RTOL


def test_the_gate_policy_scores_a_batch_in_one_pass_off_the_kernels_or_from_the_packed_copy(tiny_store,
                                                                                            float_activations) -> None:
    from m2cache.engine.policies import gate_policy
    from m2cache.formats.shares import Shares
    from m2cache.model.policy import GatePolicy
    from m2cache.storage.reader import Store

    store = Store(tiny_store.store)
    packed = gate_policy(store, Shares(0.5, 0, 0), torch.float32)
    plain = gate_policy(store, Shares(0.5, 0, 0), torch.float32, kernels=False)
    assert all(g.dtype == torch.float32 for g in plain.gates)  # the engine's cpu_kernels=False: torch only
    hs = [torch.randn(t, store.hidden, generator=torch.Generator().manual_seed(t)) for t in (1, 3, 2)]
    batch = packed.score_batch(0, hs)
    # three rows and more take the dequantised copy's one product, one row the kernel: the same scores
    assert rel_err(batch, torch.stack([packed.score(0, h) for h in hs]).amax(0)) < RTOL
    assert rel_err(batch, plain.score_batch(0, hs)) < RTOL
    # CUDA's form: the packed copy without a kernel, each layer dequantised when scored
    on_device = GatePolicy(packed.num_layers, packed.num_neurons, Shares(0.5, 0, 0), packed.gates, packed.norms,
                           packed.act, packed.resident_bytes, None, packed.group, torch.float32)
    assert rel_err(on_device.score_batch(0, hs), plain.score_batch(0, hs)) < RTOL


def test_the_gate_kernel_refuses_a_copy_of_another_layout() -> None:
    _, bundles = pool_of("int4", 4, 64, 32)
    gates = cpu_kernels.gate_rows_int4(bundles, 64, 32)
    with pytest.raises(ValueError, match="gate_rows_int4's layout"):
        cpu_kernels.gate_int4(gates, torch.randn(1, 64), 64, 16, "silu")  # another group: another width
    with pytest.raises(ValueError, match="gate_rows_int4's layout"):
        cpu_kernels.gate_int4(gates, torch.randn(1, 64), 64, 0, "silu")


@pytest.mark.parametrize("precision", quant.PRECISIONS)
@pytest.mark.parametrize("T", [1, 3])
def test_kernel_over_split_bundles_with_gate_activations_given_matches_the_whole_bundles(acts, precision: str,
                                                                                      T: int) -> None:
    # a split store's rows hold up and down only; given the gate activations the whole rows would give,
    # the FFN is the same
    dim, group = 128, 32
    _, pool = pool_of(precision, 60, dim, group, seed=8)
    split = quant.select_parts(precision, pool, 3, dim, G(group), 1, 3)
    slots = torch.tensor([59, 3, 0, 17, 40])
    h = torch.randn(T, dim, generator=torch.Generator().manual_seed(9))
    gate = quant.decode(precision, pool[slots], 3, dim, torch.float32, G(group))[:, 0]
    gact = activation("silu")(cpu_kernels.product_input(h, precision, dim, G(group)) @ gate.T).T.contiguous()  # [n, T]
    whole, parted = torch.zeros(T, dim), torch.zeros(T, dim)
    cpu_kernels.ffn_group(precision, pool, slots, h, whole, dim, G(group), "silu")
    cpu_kernels.ffn_group(precision, split, slots, h, parted, dim, G(group), "silu", gact)
    assert rel_err(parted, whole) < RTOL


def attention_layer(weights: str, seed: int = 0):
    """A LLaMA config with grouped heads (6 query heads over 2 KV heads, head dim 16) and one layer's
    resident weights in float32 or INT8 rows (a scale a row, or one per 32 values: int8g32)."""
    from m2cache.formats.int8 import Int8Weight
    from m2cache.formats.config import ModelConfig
    from m2cache.model.llama import LayerWeights
    cfg = ModelConfig.from_hf(dict(model_type="llama", hidden_size=96, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=6, num_key_value_heads=2, vocab_size=32, rms_norm_eps=1e-5,
                                   hidden_act="silu", max_position_embeddings=512, rope_theta=10000.0))
    g = torch.Generator().manual_seed(seed)
    wqkv, wo = torch.randn(10 * 16, 96, generator=g) * 0.1, torch.randn(96, 96, generator=g) * 0.1
    if weights.startswith("int8"):
        group = 32 if weights == "int8g32" else 0
        wqkv, wo = Int8Weight.quantize(wqkv, torch.float32, group), Int8Weight.quantize(wo, torch.float32, group)  # type: ignore
    norms = torch.rand(2, 96, generator=g) + 0.5
    return cfg, LayerWeights(norms[0], wqkv, wo, norms[1])


@pytest.mark.parametrize("weights", ["float32", "int8", "int8g32"])
def test_attention_kernel_agrees_with_the_torch_operators(weights: str, float_activations) -> None:
    """Forty decode positions (the cache growing past its first capacity): the kernel's residual, FFN input and
    cache equal torch's ~35 operators to float32 rounding (INT8 rows with float32 activations)."""
    from m2cache.formats.int8 import linear
    from m2cache.model.llama import KVCache, Rotary, _attend, _qkv, attention_and_norm, rms_norm, rope_slice
    cfg, w = attention_layer(weights)
    assert cpu_kernels.decode_attention_applies(torch.zeros(1, 96), w.wqkv, w.wo, w.attn_norm, w.ffn_norm)
    rope = Rotary(cfg)
    mine, theirs = KVCache(cfg, torch.float32, "cpu", capacity=8), KVCache(cfg, torch.float32, "cpu", capacity=8)
    g = torch.Generator().manual_seed(1)
    for pos in range(40):
        x = torch.randn(1, 96, generator=g)
        cos_sin = rope_slice(rope, pos, 1, torch.float32)
        got, h = attention_and_norm(cfg, w, x, 1, mine, pos, cos_sin)
        want = x + linear(_attend(cfg, _qkv(cfg, w, x), 1, theirs, pos, cos_sin, x.dtype), w.wo)
        assert rel_err(got, want) < RTOL
        assert rel_err(h, rms_norm(want, w.ffn_norm, cfg.rms_norm_eps)) < RTOL
    assert mine.data.shape == theirs.data.shape and rel_err(mine.data, theirs.data) < RTOL
    assert not mine.data[0].any()  # layer 0 untouched


@pytest.mark.parametrize("weights", ["bfloat16", "int8"])
def test_attention_kernel_in_bfloat16_is_as_close_to_float32_as_torch_operators_are(weights: str,
                                                                                   float_activations) -> None:
    """A bfloat16 engine's positions: the kernel sums in float32 and rounds once where it stores, torch's operators
    round after each; measured against the float32 product of the same weights and inputs, the kernel's residual,
    FFN input and cache are within bfloat16 rounding and no farther than torch's path."""
    from m2cache.formats.int8 import Int8Weight, linear
    from m2cache.model.llama import KVCache, LayerWeights, Rotary, _attend, _qkv, attention_and_norm, rms_norm, rope_slice
    cfg, w32 = attention_layer("float32")
    if weights == "int8":  # INT8 rows with bfloat16 scales, as a bfloat16 engine's int8 resident form holds them
        q = [Int8Weight.quantize(t, torch.bfloat16) for t in (w32.wqkv, w32.wo)]  # type: ignore[arg-type]
        w16 = LayerWeights(w32.attn_norm.bfloat16(), q[0], q[1], w32.ffn_norm.bfloat16())
        deq = [m.q.float() * m.scale.float()[:, None] for m in q]
        exact = LayerWeights(w16.attn_norm.float(), deq[0], deq[1], w16.ffn_norm.float())
    else:
        w16 = LayerWeights(*(t.bfloat16() for t in (w32.attn_norm, w32.wqkv, w32.wo, w32.ffn_norm)))  # type: ignore
        exact = LayerWeights(*(t.float() for t in (w16.attn_norm, w16.wqkv, w16.wo, w16.ffn_norm)))  # type: ignore
    assert cpu_kernels.decode_attention_applies(torch.zeros(1, 96, dtype=torch.bfloat16), w16.wqkv, w16.wo)
    rope = Rotary(cfg)
    caches = {k: KVCache(cfg, torch.float32 if k == "exact" else torch.bfloat16, "cpu") for k in ("mine", "torch", "exact")}
    g = torch.Generator().manual_seed(2)
    for pos in range(24):
        x = torch.randn(1, 96, generator=g).bfloat16()
        mine, h = attention_and_norm(cfg, w16, x, 0, caches["mine"], pos, rope_slice(rope, pos, 1, torch.bfloat16))
        cs = rope_slice(rope, pos, 1, torch.bfloat16)
        theirs = x + linear(_attend(cfg, _qkv(cfg, w16, x), 0, caches["torch"], pos, cs, x.dtype), w16.wo)
        cs32 = tuple(t.float() for t in cs)
        truth = x.float() + linear(_attend(cfg, _qkv(cfg, exact, x.float()), 0, caches["exact"], pos, cs32,
                                           torch.float32), exact.wo)
        assert mine.dtype == h.dtype == torch.bfloat16
        assert rel_err(mine.float(), truth) < 1e-2
        assert rel_err(mine.float(), truth) <= rel_err(theirs.float(), truth) + 1e-3
        assert rel_err(h.float(), rms_norm(truth, exact.ffn_norm, cfg.rms_norm_eps)) < 1e-2
    mine_kv, exact_kv = caches["mine"].data[0, :, :, :24].float(), caches["exact"].data[0, :, :, :24]
    assert rel_err(mine_kv, exact_kv) < 1e-2


@pytest.mark.parametrize("group", [0, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_rows_of_the_attention_and_the_head_meet_the_int8_values_of_their_input(dtype: torch.dtype,
                                                                                     group: int) -> None:
    """INT8 weights with INT8 activations (the default): a row's product is the dequantised rows' product with the
    INT8 values of the normed input, to float32 rounding; the attention block built on it stays within 1% of the
    float32 truth."""
    from m2cache.formats.int8 import Int8Weight
    from m2cache.model.llama import KVCache, LayerWeights, Rotary, _attend, _qkv, attention_and_norm, rms_norm, rope_slice
    g = torch.Generator().manual_seed(11)
    w, norm, x = torch.randn(300, 96, generator=g) * 0.1, torch.rand(96, generator=g) + 0.5, torch.randn(1, 96, generator=g)
    q = Int8Weight.quantize(w, dtype, group)
    deq = q.rows(torch.arange(300), torch.float32)
    x, norm = x.to(dtype), norm.to(dtype)
    normed = rms_norm(x.float(), norm.float(), 1e-5)
    got = cpu_kernels.matvec_row(x, q, norm, 1e-5)
    assert rel_err(got, cpu_kernels.int8_activation_values(normed) @ deq.T) < RTOL
    cfg, w32 = attention_layer("float32")
    qw = [Int8Weight.quantize(t, torch.float32, group) for t in (w32.wqkv, w32.wo)]  # type: ignore[arg-type]
    w8 = LayerWeights(w32.attn_norm, qw[0], qw[1], w32.ffn_norm)
    exact = LayerWeights(w32.attn_norm, *(m.rows(torch.arange(m.shape[0]), torch.float32) for m in qw), w32.ffn_norm)
    rope, mine, truth = Rotary(cfg), KVCache(cfg, torch.float32, "cpu"), KVCache(cfg, torch.float32, "cpu")
    for pos in range(8):
        xp = torch.randn(1, 96, generator=g)
        cs = rope_slice(rope, pos, 1, torch.float32)
        out, _ = attention_and_norm(cfg, w8, xp, 0, mine, pos, cs)
        want = xp + _attend(cfg, _qkv(cfg, exact, xp), 0, truth, pos, cs, xp.dtype) @ exact.wo.T
        assert rel_err(out, want) < 1e-2


def test_attention_kernel_leaves_what_it_does_not_take_to_torch() -> None:
    """Several positions, float16, or weights in another dtype than the row's: the torch operators."""
    cfg, w = attention_layer("float32")
    assert not cpu_kernels.decode_attention_applies(torch.zeros(2, 96), w.wqkv, w.wo)
    assert not cpu_kernels.decode_attention_applies(torch.zeros(1, 96, dtype=torch.bfloat16), w.wqkv, w.wo)  # mixed
    assert not cpu_kernels.decode_attention_applies(torch.zeros(1, 96, dtype=torch.float16), w.wqkv.half(), w.wo.half())  # type: ignore
    assert not cpu_kernels.decode_attention_applies(torch.zeros(1, 96), w.wqkv.bfloat16(), w.wo)  # type: ignore
    assert not cpu_kernels.decode_attention_applies(torch.zeros(1, 96), w.wqkv.t(), w.wo)  # type: ignore


@pytest.fixture
def kernel_threads():
    """The kernels' pool at 3 threads for the test, one again after it (the pool is process-wide)."""
    before = cpu_kernels.set_threads(3)
    assert cpu_kernels.threads() == 3
    yield
    cpu_kernels.set_threads(before)


@pytest.mark.parametrize("precision", ["fp16", "int8", "int4"])
@pytest.mark.parametrize("split", [False, True])
def test_kernels_shared_among_threads_agree_with_one_thread(kernel_threads, precision: str, split: bool) -> None:
    """Large enough to be shared (every part reads its 96 KiB), in both bundle layouts: the sum of the parts
    equals one thread's product to float32 rounding, rows read by slot in any order."""
    dim, group, n = 256, 32, 1200
    w, pool = pool_of(precision, n, dim, group, seed=3)
    if split:
        pool = quant.encode(precision, w[:, 1:], G(group))
    slots = torch.randperm(n, generator=torch.Generator().manual_seed(4))[:900]
    h = torch.randn(3, dim, generator=torch.Generator().manual_seed(5))
    gact = torch.randn(900, 3) if split else None
    shared, alone = torch.zeros(3, dim), torch.zeros(3, dim)
    cpu_kernels.ffn_group(precision, pool, slots, h, shared, dim, G(group), "silu", gact)
    cpu_kernels.set_threads(1)
    cpu_kernels.ffn_group(precision, pool, slots, h, alone, dim, G(group), "silu", gact)
    assert rel_err(shared, alone) < RTOL


def test_gate_scores_and_attention_shared_among_threads_equal_one_thread(kernel_threads) -> None:
    """Row-wise products: each row is computed whole by one thread, so the values are one thread's to the bit
    (the gate copy 4000 rows, 1.1 MB; the attention's projections 384 x 256 and 256 x 256 float32: shared)."""
    from m2cache.formats.config import ModelConfig
    from m2cache.model.llama import KVCache, LayerWeights, Rotary, attention_and_norm, rope_slice
    _, bundles = pool_of("int4", 4000, 128, 32, seed=6)
    gates = cpu_kernels.gate_rows_int4(bundles, 128, 32)
    h = torch.randn(2, 128)
    cfg = ModelConfig.from_hf(dict(model_type="llama", hidden_size=256, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=8, num_key_value_heads=2, vocab_size=32, rms_norm_eps=1e-5,
                                   hidden_act="silu", max_position_embeddings=64, rope_theta=10000.0))
    g = torch.Generator().manual_seed(7)
    w = LayerWeights(torch.rand(256, generator=g) + 0.5, torch.randn(384, 256, generator=g) * 0.1,
                     torch.randn(256, 256, generator=g) * 0.1, torch.rand(256, generator=g) + 0.5)
    x, cs = torch.randn(1, 256, generator=g), rope_slice(Rotary(cfg), 0, 1, torch.float32)

    def both():
        return (cpu_kernels.gate_int4(gates, h, 128, 32, "silu"),
                *attention_and_norm(cfg, w, x, 0, KVCache(cfg, torch.float32, "cpu", capacity=4), 0, cs))

    shared = both()
    cpu_kernels.set_threads(1)
    alone = both()
    assert all(torch.equal(a, b) for a, b in zip(shared, alone))


def test_a_product_right_after_the_pool_is_resized_is_answered() -> None:
    """Sizing the pool and calling a kernel at once, many times: a worker that has not run yet when the task is
    posted still answers it. On a daemon thread, so that a hang fails the test instead of hanging the suite."""
    import threading
    _, bundles = pool_of("int4", 4000, 128, 32, seed=8)
    gates = cpu_kernels.gate_rows_int4(bundles, 128, 32)
    h = torch.randn(1, 128)
    want = cpu_kernels.gate_int4(gates, h, 128, 32, "silu")
    before = cpu_kernels.threads()
    results: list[bool] = []

    def resize_and_run() -> None:
        for i in range(300):
            cpu_kernels.set_threads(2 + i % 3)
            results.append(torch.equal(cpu_kernels.gate_int4(gates, h, 128, 32, "silu"), want))

    t = threading.Thread(target=resize_and_run, daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive(), f"a kernel call never returned after a resize ({len(results)} of 300 did)"
    cpu_kernels.set_threads(before)
    assert len(results) == 300 and all(results)


def test_attention_kernel_refuses_weights_of_another_shape() -> None:
    """The C side trusts its shapes: a projection of the wrong size is a ValueError, not a read out of bounds."""
    from m2cache.model.llama import KVCache, Rotary, rope_slice
    cfg, w = attention_layer("float32")
    cos, sin = rope_slice(Rotary(cfg), 0, 1, torch.float32)
    cache = KVCache(cfg, torch.float32, "cpu", capacity=4).data[0]
    with pytest.raises(ValueError, match="shapes"):
        cpu_kernels.attention_decode(torch.randn(1, 96), w.attn_norm, 1e-5, torch.empty(0, 96), w.wo, cos, sin,
                                     cache, 0, cfg.num_heads, cfg.num_kv_heads)


def test_the_ctypes_declarations_match_the_header() -> None:
    """Every function and struct of csrc/m2cache.h as the Python side declares it (cpu_build.ABI, native_decode's
    structures): the same functions, argument counts and kinds (pointer, int64, int, float), fields in order."""
    import ctypes
    import re

    from m2cache.model import cpu_build, native_decode

    text = re.sub(r"/\*.*?\*/", "", (cpu_build.CSRC / "m2cache.h").read_text(), flags=re.S)
    kinds = {"int64_t": ctypes.c_int64, "int": ctypes.c_int, "float": ctypes.c_float, "uint64_t": ctypes.c_uint64}

    def kind(decl: str):
        decl = decl.strip()
        if "*" in decl:
            return ctypes.c_void_p
        return kinds[re.sub(r"\bconst\b", "", decl).split()[0]]

    declared = {}
    for result, name, params in re.findall(r"(\w+)\s+(m2c_\w+)\(([^)]*)\);", text):
        args = [] if params.strip() in ("", "void") else [kind(p) for p in params.split(",")]
        declared[name] = (args, None if result == "void" else kinds[result])
    assert set(declared) == set(cpu_build.ABI)
    for name, (args, result) in cpu_build.ABI.items():
        assert declared[name] == (args, result), name
    for cname, struct in (("m2c_layer", native_decode.Layer), ("m2c_model", native_decode.Model)):
        body = re.search(r"typedef struct \{([^{}]*)\}\s*" + cname + ";", text).group(1)  # type: ignore[union-attr]
        fields = []
        for decl in filter(None, (d.strip() for d in body.split(";"))):
            names = re.sub(r"\bconst\b", "", decl).split(None, 1)[1]  # past the type
            fields += [re.sub(r"[*\s]|\[\d+\]", "", n) for n in names.split(",")]
        assert fields == [f for f, _ in struct._fields_], cname


def test_loading_the_kernels_leaves_the_process_s_denormals_alone() -> None:
    """Built without -ffast-math: with gcc < 13 its crtfastmath set flush-to-zero for the whole process when the
    library loaded, and torch's float32 denormals (the dense reference's too) became zeros."""
    assert cpu_kernels.library() is not None
    tiny = torch.tensor([1e-40], dtype=torch.float32)
    assert (tiny * 1.0).item() > 0 and (torch.tensor([1e-39]) / 10).item() > 0


def test_the_kernels_compile_without_a_warning() -> None:
    """The build's flags (-Wall -Wextra) with -Werror: a warning fails here before a user's first-use build
    logs it."""
    import shutil
    import subprocess

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    flags = [f for f in cpu_build.FLAGS if f != "-shared"] + ["-Werror", "-fsyntax-only"]
    for source in cpu_build.SOURCES:
        done = subprocess.run([cc, *flags, str(source)], capture_output=True, text=True)
        assert done.returncode == 0, f"{source.name}: {done.stderr}"


def test_a_kernel_refuses_shapes_it_does_not_take() -> None:
    """The attention block checks its own shapes (heads a multiple of the KV heads, a position inside the cache,
    an INT8 group that divides the rows) and returns an error instead of reading past its arrays."""
    lib = cpu_kernels.library()
    assert lib is not None
    x = torch.zeros(64)
    cache = torch.zeros(2, 4, 8, 16)
    args = dict(x=x.data_ptr(), norm=None, eps=1e-5, wqkv=x.data_ptr(), sqkv=None, wo=x.data_ptr(), so=None)
    for H, KV, cap, pos, group in [(6, 4, 4, 0, 0), (4, 2, 4, 4, 0), (4, 2, 4, -1, 0), (0, 1, 4, 0, 0),
                                   (4, 2, 4, 0, 24), (4, 2, 4, 0, -32)]:
        rc = lib.m2c_attn_decode(args["x"], args["norm"], args["eps"], args["wqkv"], args["sqkv"], args["wo"],
                                 args["so"], group, 64, H, KV, 16, x.data_ptr(), x.data_ptr(), cache.data_ptr(), cap,
                                 pos, None, x.data_ptr(), x.data_ptr(), 0)
        assert rc == -1, (H, KV, cap, pos, group)
