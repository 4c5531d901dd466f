"""One memory limit for the whole process, split into the engine's parts (``EngineConfig.memory``).

A user who says "use 2 GB" means the process. At open the engine measures what the process already
holds (Python, torch, the caller's own objects: its resident set), keeps a margin for activations and
transients, and splits the rest:

    limit = runtime (RSS at open) + margin + reads in flight + resident weights + KV cache reserve
            + tiers (HBM + DRAM)

The resident weights take a form that fits (``resident="auto"``: of ``full`` in the compute dtype,
``int8`` and ``stream``, the one whose plan reads least per decode token, ``full`` on a tie and always
for the exact ``dense-fp16`` policy when it fits); with ``int8``, prefill also takes the policy's split instead of
every neuron at FP16 (``dense_prefill``: no whole FP16 layer staged and dequantised, so DRAM keeps more
for good). The KV reserve holds ``kv_tokens`` tokens of
the requests admitted at once, and the tiers get the rest — on the CPU computing from DRAM all of it
goes to DRAM (the device pool would be the same memory); otherwise half beyond the smallest device pool
goes to the pool (it keeps every layer's hot neurons) and half to DRAM. Budgets given explicitly win,
and must fit with the rest. A limit too small is refused at open with the smallest that works.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

from m2cache.engine.config import EngineConfig, format_size
from m2cache.engine.sizing import min_tier_budgets, plan_tiers, staging_bytes
from m2cache.errors import BudgetError
from m2cache.formats.int8 import RESIDENT_GROUP
from m2cache.model.policy import Policy
from m2cache.storage.attention_stream import Int8AttentionLayout
from m2cache.storage.reader import Store

MARGIN_MIN = 64 << 20  # activations of a step, one layer's transients, allocator slack
MARGIN_SHARE = 0.05
DEFAULT_KV_TOKENS = 512  # under a memory limit: tokens of KV cache for the requests admitted together


@dataclass(frozen=True)
class MemoryPlan:
    limit: int
    runtime: int  # the process's resident set when the engine opened (before any weight)
    margin: int
    resident_form: str
    resident: int
    kv_tokens: int
    kv: int
    hbm_budget: int
    dram_budget: int
    dense_prefill: bool = True
    reads: int = 0  # transients: blocks read while their bundles are gathered out; a dense prefill's layer

    @property
    def total(self) -> int:
        return (self.runtime + self.margin + self.reads + self.resident + self.kv + self.hbm_budget
                + self.dram_budget)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"total": self.total}

    def describe(self) -> str:
        return (f"memory {format_size(self.limit)}: runtime {format_size(self.runtime)} + margin "
                f"{format_size(self.margin)} + reads in flight {format_size(self.reads)} + resident ({self.resident_form}) {format_size(self.resident)} + KV "
                f"{self.kv_tokens} tokens {format_size(self.kv)} + device pool {format_size(self.hbm_budget)} + "
                f"DRAM {format_size(self.dram_budget)}")


def process_rss() -> int:
    """Bytes the process holds in RAM now (Linux: VmRSS; elsewhere the peak, an upper bound)."""
    try:
        with open(f"/proc/{os.getpid()}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD = 1 << 20


def _libc():
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def return_freed_memory(*, large_allocations_mapped: bool = False) -> None:
    """Hands memory the allocator keeps after a free back to the OS (glibc; elsewhere nothing).

    glibc serves allocations below a threshold that grows to 32 MB from its heap, and a heap keeps what was
    freed: loading the 7B shape's resident part (tensors read, quantised, dropped) left 240 MB held that
    no tensor used. ``malloc_trim`` returns it; ``large_allocations_mapped`` also pins the threshold at
    1 MiB, so every later large buffer is its own mapping and goes back to the OS when freed."""
    libc = _libc()
    if libc is None:
        return
    if large_allocations_mapped:  # process-wide, and left so: the limit it serves is the process's too
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    libc.malloc_trim(0)


STREAM_DEPTH = 1  # resident="stream": layers of attention read ahead of the one computing
# What a streamed attention byte costs against an FFN byte when the plan picks the resident form: a layer's
# attention is one aligned sequential read, on its own thread, a layer ahead of its use, so it overlaps the
# compute and uses bandwidth the FFN's scattered reads (bound by reads a second) leave, where the FFN's
# reads are what a step waits for. Measured on the 7B split store (O_DIRECT, 2 cores), in turn:
# - 40% (1.5 GB), policy gate:0,0,1: int8 resident 418 MB of FFN reads a token, 0.57 tokens/s; stream
#   546 MB of attention and none of FFN, 1.51 tokens/s (stall 2.4%);
# - 40%, gate-40: int8 1169 MB of FFN, 0.27-0.33; stream 699 + 546, 0.36-0.42;
# - 60% (2.26 GB), gate-40: int8 506 MB of FFN, 0.53-0.56; stream 262 + 546, 0.58-0.66.
STREAM_READ_WEIGHT = 0.25


def resident_bytes_of(store: Store, form: str, dtype_bytes: int) -> int:
    """Bytes the resident weights take in ``form``, from the store's shapes (nothing loaded)."""
    cfg = store.config
    D, hd = cfg.hidden_size, cfg.head_dim
    attn = _attention_weights(store)
    attn_rows = (cfg.num_heads + 2 * cfg.num_kv_heads) * hd + D
    norms = (2 * cfg.num_layers + 1) * D * dtype_bytes
    table = cfg.vocab_size * D
    if form == "full":
        tables = table * (1 if cfg.tie_word_embeddings else 2)
        return cfg.num_layers * attn * dtype_bytes + tables * dtype_bytes + norms
    # int8: one byte a weight and a scale a row, or a float32 one per RESIDENT_GROUP values (counted: the larger);
    # the embeddings are read from the store per token
    head = table + max(cfg.vocab_size * dtype_bytes, 4 * table // RESIDENT_GROUP)
    if form == "int8":
        return cfg.num_layers * (attn + max(attn_rows * dtype_bytes, 4 * attn // RESIDENT_GROUP)) + head + norms
    # stream: the layers held (the one computing and those read ahead), from the store's INT8 file; or from
    # the resident file, the matrices in the compute dtype and the largest one as read (2 bytes a weight)
    # before it is converted
    if store.manifest.get("attention_int8"):
        layout = Int8AttentionLayout.of_entry(cfg, store.manifest["attention_int8"])
        return (STREAM_DEPTH + 1) * layout.held_bytes(dtype_bytes) + head + norms
    largest = max(cfg.num_heads * hd, cfg.num_kv_heads * hd) * D * 2
    return (STREAM_DEPTH + 1) * attn * dtype_bytes + largest + head + norms


def stream_read_bytes(store: Store) -> int:
    """What ``resident="stream"`` reads off the store per decode token: every layer's projections."""
    int8 = store.manifest.get("attention_int8")
    if int8:
        return store.config.num_layers * int8["layer_bytes"]
    return store.config.num_layers * _attention_weights(store) * 2  # the resident file's FP16/BF16


def _attention_weights(store: Store) -> int:
    """Weights of one layer's attention projections: q, k, v [(H+2KV)*hd, D] and o [D, H*hd]."""
    cfg = store.config
    return (2 * cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim * cfg.hidden_size


def kv_bytes_per_token(store: Store, dtype_bytes: int) -> int:
    cfg = store.config
    return cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * dtype_bytes


def plan_memory(store: Store, cfg: EngineConfig, policy: Policy, *, cpu_direct: bool,
                runtime: int | None = None) -> MemoryPlan:
    """Splits ``cfg.memory`` (see the module's doc); BudgetError, with the smallest limit, when it cannot."""
    assert cfg.memory is not None and not str(cfg.device).startswith("cuda"), "EngineConfig refuses memory= on CUDA"
    limit = int(cfg.memory)
    runtime = process_rss() if runtime is None else runtime
    fitting = [n for n in _candidates(store, cfg, policy, cpu_direct, runtime, limit) if n.floor <= limit]
    if not fitting:
        need = _needs(store, cfg, policy, cpu_direct, runtime, limit)
        raise BudgetError(f"memory {format_size(limit)} is too small: {need.why()}; the smallest memory that works is "
                          f"about {format_size(need.smallest)} ({need.smallest} bytes)"
                          + ("" if need.form == "int8" or cfg.resident != "full" else ", or use resident='int8'"))
    lent = cpu_direct and cfg.preload in ("auto", "layer", "hybrid")  # the pool's budget is lent to DRAM
    plans = [_split(n, cfg, limit, lent) for n in fitting]
    if len(plans) == 1 or policy.exact:  # the exact policy keeps the dense model's resident form when it fits
        return plans[0]
    # otherwise the form that reads least per token once warm (ties: the first, full before int8): on the 7B
    # shape at 3.87 GB the full resident part left DRAM 1.2 GB and 720 MB of reads a token. Streamed
    # attention counts at STREAM_READ_WEIGHT of its bytes (see there)
    def reads(plan: MemoryPlan) -> float:
        tier_cfg = cfg.replace(hbm_budget=plan.hbm_budget, dram_budget=plan.dram_budget,
                               dense_prefill=plan.dense_prefill, resident=plan.resident_form)
        ffn = plan_tiers(store, tier_cfg, policy, cpu_direct=cpu_direct).decode_read_bytes
        return ffn + (STREAM_READ_WEIGHT * stream_read_bytes(store) if plan.resident_form == "stream" else 0)

    return min(plans, key=reads)


def _split(need: "_Needs", cfg: EngineConfig, limit: int, lent: bool) -> MemoryPlan:
    spare = limit - need.floor
    hbm = cfg.hbm_budget if cfg.hbm_budget is not None else (0 if lent else need.min_hbm + spare // 2)
    dram = cfg.dram_budget if cfg.dram_budget is not None else limit - need.fixed - need.resident - int(hbm)
    plan = MemoryPlan(limit, need.runtime, need.margin, need.form, need.resident, need.kv_tokens, need.kv,
                      int(hbm), int(dram), need.dense_prefill, need.reads)
    assert plan.total <= limit, f"the memory plan exceeds its limit: {plan.describe()}"
    return plan


def smallest_memory(store: Store, cfg: EngineConfig, policy: Policy, *, cpu_direct: bool,
                    runtime: int) -> tuple[int, str]:
    """(the smallest ``memory`` that works, what it is made of), for a process holding ``runtime`` bytes
    before the engine: what ``m2cache bench`` lists for a limit that m2cache does not fit."""
    need = _needs(store, cfg.replace(memory=1 << 50), policy, cpu_direct, runtime, None)
    return need.smallest, need.why()


@dataclass(frozen=True)
class _Needs:
    runtime: int
    margin: int
    form: str
    resident: int
    kv_tokens: int
    kv: int
    min_hbm: int
    tiers: int  # the smallest tiers (or the budgets given)
    budgets_given: bool
    dense_prefill: bool
    reads: int

    @property
    def fixed(self) -> int:
        return self.runtime + self.margin + self.kv + self.reads

    @property
    def floor(self) -> int:
        return self.fixed + self.resident + self.tiers

    @property
    def smallest(self) -> int:
        """The smallest limit that works: the margin grows with the limit (max(MARGIN_MIN, share x limit))."""
        without = self.floor - self.margin
        return max(without + MARGIN_MIN, int(without / (1 - MARGIN_SHARE)) + 1)

    def why(self) -> str:
        return (f"the process already holds {format_size(self.runtime)}, and the engine needs a margin of "
                f"{format_size(self.margin)}, reads in flight {format_size(self.reads)}, resident weights ({self.form}) {format_size(self.resident)}, a KV "
                f"cache of {self.kv_tokens} tokens {format_size(self.kv)} and tiers of at least "
                f"{format_size(self.tiers)}" + (" (the budgets given)" if self.budgets_given else "")
                + ("" if self.dense_prefill else " (prefill split by the policy)"))


def _needs(store: Store, cfg: EngineConfig, policy: Policy, cpu_direct: bool, runtime: int,
           limit: int | None) -> _Needs:
    """The first choice of resident form and prefill that fits ``limit`` (None, or none fits: the one whose
    smallest limit is least)."""
    options = _candidates(store, cfg, policy, cpu_direct, runtime, limit)
    fits = [n for n in options if limit is not None and n.floor <= limit]
    return fits[0] if fits else min(options, key=lambda n: n.smallest)


def _candidates(store: Store, cfg: EngineConfig, policy: Policy, cpu_direct: bool, runtime: int,
                limit: int | None) -> list[_Needs]:
    """What the engine needs beside the tiers' spare, for each choice of resident form and prefill, the
    one that needs most first. What gives way when the limit is tight: the resident form goes to int8
    and, with it, prefill takes the policy's split (a dense prefill reserves a whole FP16 layer staged and
    dequantised: on the 7B shape 540 MB that DRAM then holds for good instead)."""
    margin = max(MARGIN_MIN, int((limit or 0) * MARGIN_SHARE))
    dtype_bytes = {"float32": 4, "bfloat16": 2, "float16": 2}[cfg.dtype]
    kv_tokens = cfg.kv_tokens or min(DEFAULT_KV_TOKENS, store.config.max_position_embeddings)
    kv = kv_tokens * kv_bytes_per_token(store, dtype_bytes)
    forms = [cfg.resident] if cfg.resident != "auto" else ["full", "int8", "stream"]
    choices = [(f, f == "full" if cfg.dense_prefill is None else cfg.dense_prefill) for f in forms]
    if cfg.dense_prefill is None and cfg.resident == "full":
        choices.append(("full", False))
    out = []
    for form, dense_prefill in choices:
        tier_cfg = cfg.replace(dense_prefill=dense_prefill)
        min_hbm, min_dram = min_tier_budgets(store, tier_cfg, policy, cpu_direct=cpu_direct)
        tiers = ((int(cfg.hbm_budget) if cfg.hbm_budget is not None else min_hbm)
                 + (int(cfg.dram_budget) if cfg.dram_budget is not None else min_dram))
        # a neuron-level read holds the blocks it read while it copies the bundles out (as much again as
        # the staging it fills), and torch's prefill dequantises a whole layer; measured on the 7B shape:
        # without counting them, the process's peak passed the plan
        reads = staging_bytes(store, tier_cfg, policy)
        if dense_prefill or not cpu_direct:  # torch's prefill: a whole layer dequantised to the compute dtype
            reads += store.num_neurons * store.parts * store.hidden * dtype_bytes
        out.append(_Needs(runtime, margin, form, resident_bytes_of(store, form, dtype_bytes), kv_tokens, kv, min_hbm,
                          tiers, cfg.hbm_budget is not None or cfg.dram_budget is not None, dense_prefill, reads))
    return out
