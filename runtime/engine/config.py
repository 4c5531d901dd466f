"""EngineConfig: every knob of the tiered engine, validated at construction."""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

from m2cache.errors import ConfigError
from m2cache.storage.ssd_sim import SimulatedSSD

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "k": 10**3, "m": 10**6, "g": 10**9}
PRELOADS = ("auto", "layer", "neuron", "hybrid")
RESIDENT_FORMS = ("auto", "full", "int8", "stream")
DEFAULT_HBM, DEFAULT_DRAM = "64MB", "96MB"  # without a memory limit and without budgets
DEVICES = ("cpu", "cuda")
# Prompt tokens a prefill step takes of one request. A 2,000-token prompt on the demo model (2 cores) froze
# the running streams for its whole prefill; in chunks of 256 they get a token between chunks (see
# docs/results/serve_chunked_prefill_itl.txt). Whole-layer prefill reads repeat per chunk: on a slow disk a
# larger chunk trades latency for bytes.
DEFAULT_PREFILL_CHUNK = 256
DEFAULT_WINDOW = 1.0  # decode tokens of FP16/INT8 neurons the DRAM window holds (EngineConfig.window)


def parse_size(value: int | float | str, what: str = "size") -> int:
    """``"48MB"``, ``"1.5GiB"``, ``"512KB"`` or a number of bytes -> bytes."""
    if isinstance(value, bool):
        raise ConfigError(f"{what}: expected a size such as '48MB' or a number of bytes, got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ConfigError(f"{what} must not be negative, got {value}")
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(f"{what}: cannot read {value!r}; write a size such as '48MB', '1.5GiB' or 50000000")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{int(n)}B"


@dataclass(frozen=True)
class EngineConfig:
    """How the engine tiers, schedules and computes.

    hbm_budget: bytes of the device neuron pool (the "HBM" tier; on the CPU a capacity-limited pool).
    dram_budget: bytes of the host DRAM FIFO of layers (and staging for neuron-level reads).
        Either budget left None is sized from ``memory`` (64MB and 96MB without one).
    memory: one limit for the whole process on the CPU (``"2GB"``): the engine measures what the process
        holds at open and splits the rest into resident weights, KV cache and tiers
        (:mod:`m2cache.engine.memory`); refused at open, with the smallest that works, when too small.
    resident: the form of attention, embeddings and LM head: "full" (the compute dtype: what the dense
        reference holds), "int8" (INT8, embeddings read per token from the store: about half the bytes; on the
        CPU with its kernels a scale per 32 values, measured as good as full on held-out text, else a scale a
        row, at a small quality cost; ``m2cache eval --resident int8`` measures it),
        "stream" (CPU: the LM head as int8, the attention projections read per layer from the store a few
        layers ahead, in the compute dtype) or "auto" (under a memory limit, of the forms that fit the one
        that reads least per token; without one int8 where it comes in groups of 32, else full, and full for
        the exact dense-fp16 policy).
    dense_prefill: prefill with every neuron at FP16 (True: a long prompt activates nearly all of them), or
        with the policy's split, as decode (False: a layer's staging shrinks from a whole FP16 layer to the
        policy's bytes; teacher-forced ``m2cache eval`` measures exactly this). None: True, unless a memory
        limit needs it off.
    kv_tokens: tokens of KV cache the running requests may hold together; a request waits until its
        prompt + max_new_tokens fit. None: no bound without ``memory``, 512 tokens with it.
    prefetch: how many layers ahead of the executor the DRAM tier preloads from the SSD (k).
    preload: "layer" (whole layers into DRAM), "neuron" (only missing bundles, read on demand),
        "hybrid" (whole layers ahead when they fit; neuron-level reads for a layer not yet in DRAM) or
        "auto" (hybrid: the fastest measured with the store in the page cache; on a slow SSD, where
        bytes dominate, "neuron" reads a third of them for a sparse or mixed policy).
    fixed_layers: layers kept in DRAM for good (the FIFO's fixed area); None = as many as the budget
        leaves after the preload ring.
    policy: precision policy name ("dense-fp16", "oracle", or one stored in the store); None = the
        store's default.
    device: "cpu" or "cuda". dtype: compute dtype ("float32", "bfloat16", "float16").
    ssd_sim: a simulated SSD spec such as "latency=5ms,bandwidth=200MB/s,seed=1" (None = the real disk).
    direct_io: read the store with O_DIRECT where the filesystem allows (the tiers are then the only copy of
        what was read, and the page cache is not filled); None: on under a memory limit, off without one.
        With it, the DRAM tier keeps the entries that save the most disk bytes (a precision of every layer)
        when that reads less per token than preloading whole layers ahead.
    io_threads: threads serving SSD reads.
    compute_threads: torch's intra-op threads while the engine runs on the CPU (process-wide, restored at
        close). "auto": every core when the tier plan reads at most a quarter of the FFN bytes a decode
        token computes from (measured on 2 cores: nothing read, 7B shape 4.26 vs 3.51 tokens/s, demo
        8.78 vs 7.08; split 7B store at 3.6 GiB reading 5%, 1.15 vs 0.66), else 1, since the I/O threads
        and the event loop need the other cores (on the 2-core machine one thread decoded ~30% faster
        reading every token: dense-fp16 7.0 vs 5.3).
        The C kernels' own threads (``cpu_kernels.set_threads``: the attention block's projections, the
        gate scores, the FFN's neurons) follow the same number. None leaves both settings alone.
    cpu_kernels: decode FFNs on the CPU through m2cache's C kernels, straight over the pool rows (built
        on first use with the system C compiler; without one, or with False, torch gathers and
        dequantises the rows). The exact ``dense-fp16`` policy always keeps torch's dense code. The
        copies into the pool on the CPU go through the kernels' row copy too (torch's gather and scatter
        with False). The decode attention kernel is not this flag's: the dense reference takes it too, so
        both agree; ``M2CACHE_KERNELS=0`` turns every kernel off.
    compute_from_dram: on the CPU with whole layers preloaded, decode computes straight from DRAM's layer
        tensors and the device pool is not used (its budget is lent to DRAM). False keeps the device pool
        and its copies up even on the CPU: the path CUDA always takes, there to profile it without a GPU.
    trace: a path to write the run's trace to on close, True to record without writing, or None.
    max_queued_tokens: tokens a request may have waiting for its consumer before the scheduler skips it.
    max_batch: decode steps take up to this many ready sequences together (one fetch per layer for all);
        1 serves them one at a time. The tier budgets do not grow with the batch.
    batch_invariant: each sequence of a batch keeps the neurons it would keep alone and computes as it would
        alone; the batch fetches the union of their cuts once per layer (``m2cache.actors.rows``). A
        request's greedy tokens are then the same alone and in any batch, under every policy. False shares
        one cut for the batch (ranked by the largest score any sequence gives) and batched products: fewer
        bytes and passes over the weights per step with many requests, a text that depends on its neighbours.
        ``dense-fp16`` computes each sequence alone either way.
    prefill_chunk: prompt tokens one prefill step takes of a request (cut at fixed offsets of its prompt), so
        the running streams get a token between chunks; None prefills a prompt in one step. The dense
        reference (``--dense``) prefills in the same chunks, so ``dense-fp16`` still equals it.
    admit_timeout: seconds a request may wait for room in the KV cache (``kv_tokens``) before it is refused
        with ``OverloadedError``; None waits as long as it takes.
    lookahead: decode ranks layer L+1's neurons from the residual layer L has after its attention (under
        layer L+1's FFN norm), so the plan, reads and copies of layer L+1 run while layer L computes; each
        FFN still computes exactly over the rows it was given. Costs some quality (``m2cache eval`` with a
        policy name ending in ``@ahead`` measures it). Policies that score nothing (``dense-fp16``) and
        prefills are unchanged. False ranks every layer from its own FFN input.
    window: on the CPU computing from DRAM, room in the DRAM budget for the FP16 and INT8 neurons of this many
        decode tokens (all layers), kept at the precision they were read at (``actors.dram``'s window): a token
        reads off the store only the neurons the last ones did not. Taken from what would otherwise keep whole
        layers of those precisions for good, after the layers of the precision most neurons take; 0 turns it off.
    native_decode: on the CPU, once the DRAM tier holds every layer of every precision the gate policy uses
        for good (the whole store fits its budget), a decode token of one sequence runs as one native call
        (every layer's attention, neuron choice and FFN, then the LM head: ``m2cache.actors.native_step``)
        instead of layer by layer through the actors; same kernels, same values. False keeps the
        layer-by-layer step (to compare them).
    """

    hbm_budget: int | str | None = None
    dram_budget: int | str | None = None
    memory: int | str | None = None
    resident: str = "auto"
    kv_tokens: int | None = None
    dense_prefill: bool | None = None
    prefetch: int = 2
    preload: str = "auto"
    fixed_layers: int | None = None
    policy: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    ssd_sim: str | None = None
    direct_io: bool | None = None
    io_threads: int = 4
    compute_threads: int | str | None = "auto"
    cpu_kernels: bool = True
    compute_from_dram: bool = True
    trace: str | bool | None = None
    max_queued_tokens: int = 64
    max_batch: int = 16
    lookahead: bool = False
    batch_invariant: bool = True
    prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK
    admit_timeout: float | None = None
    native_decode: bool = True
    window: float = DEFAULT_WINDOW

    def __post_init__(self) -> None:
        if self.memory is not None:
            object.__setattr__(self, "memory", parse_size(self.memory, "memory"))
            if self.memory <= 0:  # type: ignore[operator]
                raise ConfigError(f"memory must be above 0 bytes, got {self.memory}")
            if str(self.device).startswith("cuda"):
                raise ConfigError("memory= sizes a CPU engine (the limit is the process's RAM); on CUDA give "
                                  "hbm_budget (device memory) and dram_budget (host memory)")
        if self.direct_io is None:
            object.__setattr__(self, "direct_io", self.memory is not None)
        for name, default in (("hbm_budget", DEFAULT_HBM), ("dram_budget", DEFAULT_DRAM)):
            value = getattr(self, name)
            if value is None and self.memory is None:
                value = default
            object.__setattr__(self, name, None if value is None else parse_size(value, name))
        if self.resident not in RESIDENT_FORMS:
            raise ConfigError(f"resident must be one of {', '.join(RESIDENT_FORMS)}, got {self.resident!r}")
        if self.kv_tokens is not None and self.kv_tokens < 1:
            raise ConfigError(f"kv_tokens must be >= 1 (or None), got {self.kv_tokens}")
        if not isinstance(self.prefetch, int) or not 0 <= self.prefetch <= 16:
            raise ConfigError(f"prefetch must be a whole number of layers from 0 to 16, got {self.prefetch!r}")
        if self.preload not in PRELOADS:
            raise ConfigError(f"preload must be one of {', '.join(PRELOADS)}, got {self.preload!r}")
        if self.fixed_layers is not None and self.fixed_layers < 0:
            raise ConfigError(f"fixed_layers must be >= 0, got {self.fixed_layers}")
        dev = str(self.device).split(":")[0]
        if dev not in DEVICES:
            raise ConfigError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.resident == "stream" and dev == "cuda":
            raise ConfigError("resident='stream' reads attention per layer into host memory: CPU only; on CUDA "
                              "use 'full' or 'int8'")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.compute_threads is not None and self.compute_threads != "auto" and (
                not isinstance(self.compute_threads, int) or self.compute_threads < 1):
            raise ConfigError(f"compute_threads must be 'auto', a whole number >= 1, or None; got {self.compute_threads!r}")
        if self.io_threads < 1:
            raise ConfigError(f"io_threads must be >= 1, got {self.io_threads}")
        if not isinstance(self.window, (int, float)) or not 0 <= self.window <= 64:
            raise ConfigError(f"window must be a number of decode tokens from 0 (off) to 64, got {self.window!r}")
        if self.max_batch < 1:
            raise ConfigError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.prefill_chunk is not None and (not isinstance(self.prefill_chunk, int) or self.prefill_chunk < 1):
            raise ConfigError(f"prefill_chunk must be a whole number of tokens >= 1 (or None), got {self.prefill_chunk!r}")
        if self.admit_timeout is not None and not self.admit_timeout > 0:
            raise ConfigError(f"admit_timeout must be a number of seconds above 0 (or None), got {self.admit_timeout!r}")
        if self.max_queued_tokens < 1:
            raise ConfigError(f"max_queued_tokens must be >= 1, got {self.max_queued_tokens}")
        if self.ssd_sim is not None:
            SimulatedSSD.parse(self.ssd_sim)  # raises ConfigError naming the bad key

    def replace(self, **changes: Any) -> "EngineConfig":
        return replace(self, **changes)

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)
