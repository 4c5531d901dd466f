"""What ``m2cache bench`` runs: the model, its systems (one row each), what each needs, and its jobs.

Rows: ``m2cache`` (the default policy of the model's m2cache store, a gate policy from its split view),
``m2cache:POLICY`` (m2cache along its frontier: ``--policies``, or :data:`FRONTIER` where gate policies run),
``m2cache-dense-fp16`` (tiering alone, exact), ``llama-TYPE`` (llama.cpp on its GGUF of that type),
``hf-bf16`` / ``hf-fp32`` (transformers, every weight resident), ``hf-offload`` (accelerate) and
``layer-stream`` (AirLLM's way).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from m2cache.bench.memlimit import resolve_budget
from m2cache.bench.model import (GGUF_TYPES, RANDOM_GGUF_TYPES, bench_model, ensure_ggufs, ensure_split, gguf_paths,
                                 grown_model)
from m2cache.bench.report import GB
from m2cache.bench.systems import Job
from m2cache.engine.config import RESIDENT_FORMS, EngineConfig, parse_size
from m2cache.formats.shares import Shares

# imports inside functions: they load torch; the bench's children import this module (through
# m2cache.bench.harness), and a child holds torch only when its system runs on it

# `m2cache demo`'s prompts; the bench's default is the first
DEMO_PROMPTS = ("Why is the sky blue?", "Write a haiku about a cache.")
LLAMA_SYSTEMS = tuple(f"llama-{t}" for t in GGUF_TYPES)
SYSTEMS = ("m2cache", "m2cache-frontier", "m2cache-dense-fp16", *LLAMA_SYSTEMS, "hf-bf16", "hf-fp32", "hf-offload",
           "layer-stream")
QUICK_SYSTEMS = ("m2cache", "llama-f16", "llama-q4_0", "hf-offload", "layer-stream")
# m2cache's frontier where gate policies run (up and down fetched), from every neuron at INT4 (0.21 of the dense FP16 FFN bytes a token on
# the grown model) through the default gate-25 (0.25) and gate-40 (0.29) to more FP16 and INT8 (0.41)
FRONTIER = ("gate:0,0,1", "gate:0,0.1,0.9", "gate:0.1,0.2,0.7", "gate:0.3,0.4,0.3")
BYTES_PER_WEIGHT = {"hf-bf16": 2.0, "hf-fp32": 4.0, "hf-offload": 2.0, "layer-stream": 2.0, "m2cache-dense-fp16": 2.0}
# measured RSS before any weight: python + torch + m2cache 0.23 GB, + transformers/accelerate 0.35 GB;
# the margins cover activations, the KV cache, code pages and one layer's transients. m2cache's rows size
# themselves from the limit (EngineConfig.memory: the engine measures its own process at open)
PY_OVERHEAD, HF_OVERHEAD, LLAMA_OVERHEAD = 350 << 20, 500 << 20, 200 << 20
FITS_READ_BYTES = 1 << 20  # a decode token reading less than this off the disk holds its weights
REPACK_ROOM = 1.25  # llama.cpp's repacking wants its file's bytes and a quarter more within the limit
M2CACHE_RUNTIME = 300 << 20  # the m2cache child's own RSS when its engine opens: measured 274-279 MB (7B shape)
PEERS_HINT = ("llama-cpp-python is not installed: `make peers` (or pip install 'm2cache[peers]') builds it from "
              "source, about 16 minutes on 2 cores")


@dataclass
class Model:
    store: Path  # the whole store (every policy; the dense reference)
    hf: Path
    gguf: dict[str, Path] = field(default_factory=dict)
    label: str = ""
    split: Path | None = None  # its split store: gate policies fetch up and down only
    random: bool = False  # random weights: no perplexity (it would mean nothing)
    root: Path | None = None  # where its quality.json is kept


def resolve_model(args) -> Model:
    want_gguf = any(s.startswith("llama") for s in expand_systems(args)) and have_llama()
    if args.store:
        store = Path(args.store)
        hf = Path(args.hf) if args.hf else store.parent / "hf"
        gg = ensure_ggufs(store, store.parent) if want_gguf else gguf_paths(store.parent)
        return Model(store, hf, gg, store.parent.name, split=Path(args.split) if args.split else None,
                     random=args.random, root=store.parent)
    if args.model == "demo":  # in RAM: its default policy, as a user gets it
        from m2cache.offline.convert import fetch_demo

        store = fetch_demo()
        gg = ensure_ggufs(store, store.parent) if want_gguf else gguf_paths(store.parent)
        return Model(store, store.parent / "hf", gg, "SmolLM2-135M (demo)", split=ensure_split(store, store.parent),
                     root=store.parent)
    if args.model == "grown":
        m = grown_model(gguf=want_gguf)
        label = "SmolLM2-135M grown x16 (hidden 9216, real weights)"
        return Model(m["store"], m["hf"], m["gguf"] or gguf_paths(m["store"].parent), label, split=m["split"],
                     root=m["store"].parent)
    m = bench_model(gguf=want_gguf)
    return Model(m["store"], m["hf"], m["gguf"] or gguf_paths(m["store"].parent, RANDOM_GGUF_TYPES),
                 "LLaMA-2-7B shape, 8 layers, random weights", split=m["split"], random=True, root=m["store"].parent)


def have_llama() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def _missing_bench_packages(system: str) -> list[str]:
    """The 'bench' extra's packages a system's child process imports and this environment lacks."""
    needs = {"hf-offload": ("transformers", "accelerate")}.get(system, ("transformers",) if system.startswith("hf") else ())
    return [m for m in needs if importlib.util.find_spec(m) is None]


def expand_systems(args) -> list[str]:
    """``--systems`` (or the default set) with ``m2cache-frontier`` left for the Plan to expand."""
    spec = args.systems or ",".join(QUICK_SYSTEMS if args.quick else SYSTEMS)
    systems = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [s for s in systems if row_options(s)[0] not in SYSTEMS and not s.startswith("m2cache:")]
    if unknown:
        raise SystemExit(f"m2cache bench: unknown systems {unknown}; known: {', '.join(SYSTEMS)}, m2cache:POLICY, and "
                         f"a m2cache row with options: ROW@{'=V@'.join(ROW_OPTIONS)}=V (one lever on or off beside the others)")
    return systems


ROW_OPTIONS = ("window", "lookahead", "store", "resident")


def row_options(system: str) -> tuple[str, dict[str, str]]:
    """A row's system and its options: ``m2cache@window=0`` is the ``m2cache`` row with ``EngineConfig.window`` 0,
    ``@lookahead=1`` turns the lookahead on, ``@store=PATH`` runs it on another store of the same model (a
    placed one: ``m2cache place``), ``@resident=FORM`` holds the resident part in that form (``--resident``);
    so one run measures a lever on and off side by side."""
    base, *parts = system.split("@")
    opts = dict(part.partition("=")[::2] for part in parts)
    bad = [k for k in opts if k not in ROW_OPTIONS] + [f"resident={v}" for k, v in opts.items()
                                                      if k == "resident" and v not in RESIDENT_FORMS]
    if bad or parts and not base.startswith("m2cache"):
        raise SystemExit(f"m2cache bench: {system}: options are for m2cache rows, of: {', '.join(ROW_OPTIONS)} "
                         f"(resident one of {', '.join(RESIDENT_FORMS)})")
    return base, opts


class Plan:
    """What every limit shares: the model, its sizes, the prompts, the systems."""

    def __init__(self, args, model: Model) -> None:
        from m2cache.engine.loading import load_tokenizer
        from m2cache.engine.policies import default_policy_name
        from m2cache.storage.reader import SPLIT, Store

        self.args, self.model = args, model
        self.store = Store(model.store)
        # what gate policies fetch: the store's own split view (format 3), or an older version's split store
        split = Store(model.split) if model.split else self.store
        self.split = split if split.split else split.with_view(SPLIT) if SPLIT in split.views else None
        cfg = self.store.config
        self.resident_fp16 = int(self.store.manifest["resident"]["size"])
        self.ffn_fp16 = self.store.layer_bytes("fp16") * cfg.num_layers
        self.fp16_bytes = self.resident_fp16 + self.ffn_fp16
        self.params = self.fp16_bytes // 2
        self.cuda = args.device.startswith("cuda")
        self.notes: list[str] = []
        self.policy = args.policy or default_policy_name(self.split or self.store)
        self.systems = self._systems(expand_systems(args))
        if not (model.hf / "config.json").is_file():
            self.notes.append(f"no HF folder at {model.hf} (give --hf): transformers baselines and layer-stream skipped")
            self.systems = [s for s in self.systems if not s.startswith(("hf", "layer"))]
        if "m2cache" in self.systems and self.policy == "dense-fp16" and "m2cache-dense-fp16" in self.systems:
            self.systems.remove("m2cache")
            self.notes.append("the store's default policy is dense-fp16: the 'm2cache' row is skipped as the same as "
                              "m2cache-dense-fp16; train predictors (`m2cache train-predictor`) or lay it out anew (`m2cache upgrade`)")
        tok = load_tokenizer(self.store)
        self.prompts = [tok.encode(p, raw=False) for p in (args.prompts or DEMO_PROMPTS[:1])]
        self.dtype = args.m2cache_dtype or ("float16" if self.cuda else "bfloat16")  # as the BF16 and F16 peers
        self.dtype_bytes = {"float32": 4, "bfloat16": 2, "float16": 2}[self.dtype]

    def _systems(self, spec: list[str]) -> list[str]:
        out: list[str] = []
        for s in spec:
            if s.startswith("llama-") and not self.args.systems and s.removeprefix("llama-") not in self.model.gguf:
                continue  # the default set: the types this model has files for (the random one has four)
            if s != "m2cache-frontier":
                out.append(s)
                continue
            frontier = self.args.policies or (FRONTIER if self.split else ())
            out += [f"m2cache:{p}" for p in frontier if p != self.policy]
        return list(dict.fromkeys(out))

    # ---- per row ---------------------------------------------------------------------------------
    def row_policy(self, system: str) -> str | None:
        system = row_options(system)[0]
        if system == "m2cache":
            return self.policy
        if system == "m2cache-dense-fp16":
            return "dense-fp16"
        return system.removeprefix("m2cache:") if system.startswith("m2cache:") else None

    def row_store(self, system: str):
        """The store a m2cache row runs on: the split store for gate policies when there is one."""
        from m2cache.engine.policies import is_gate_policy

        name, store = self.row_policy(system), row_options(system)[1].get("store")
        if store:
            from m2cache.engine.policies import store_for_policy
            from m2cache.storage.reader import Store

            other = Store(Path(store).expanduser())
            return store_for_policy(other, name) if name else other
        if self.split is not None and name is not None and is_gate_policy(self.split, name):
            return self.split
        return self.store

    def shares(self, system: str):
        """The row's policy's shares (one per layer), without loading its predictors or gate rows."""
        from m2cache.engine.policies import parse_shares
        from m2cache.model.predictor import shares_from_spec

        name, store = self.row_policy(system) or "dense-fp16", self.row_store(system)
        spec = (store.manifest.get("policies") or {}).get(name, {})
        L = store.config.num_layers
        shares = (shares_from_spec(spec, L) if spec.get("shares") else parse_shares(name) if ":" in name else Shares())
        return shares if isinstance(shares, list) else [shares] * L

    def bytes_per_weight(self, system: str, resident_form: str | None = None) -> float | None:
        """Bytes per weight of what the row computes with: its resident part in the form it held, its FFN at
        each precision's share of the bundles it fetches (a split store: up and down, plus the INT4 gate copy)."""
        if not system.startswith("m2cache") or system == "m2cache-dense-fp16":
            if system.startswith("llama-"):
                path = self.model.gguf.get(system.removeprefix("llama-"))
                return path.stat().st_size / self.params if path and path.is_file() else None
            return BYTES_PER_WEIGHT.get(system)
        from m2cache.engine.memory import resident_bytes_of
        from m2cache.engine.policies import gate_copy_bytes

        store = self.row_store(system)
        bb = {p: store.bundle_bytes(p) for p in ("fp16", "int8", "int4")}
        per_neuron = sum(sum(getattr(s, p) * bb[p] for p in bb) for s in self.shares(system)) / len(self.shares(system))
        ffn = per_neuron * store.num_neurons * store.config.num_layers
        if store.split:
            ffn += gate_copy_bytes(store)
        form = resident_form if resident_form in ("full", "int8") else "int8" if resident_form == "stream" else "full"
        return (ffn + resident_bytes_of(store, form, self.dtype_bytes)) / self.params

    def gate_copy_bytes(self, name: str, store=None) -> int:
        """What a gate policy holds beside the tiers (its packed INT4 gate rows, in the child's RSS when its
        engine plans); 0 for other policies."""
        from m2cache.engine.policies import gate_copy_bytes, is_gate_policy

        store = store or self.store
        return gate_copy_bytes(store) if is_gate_policy(store, name) else 0

    def needs(self, system: str) -> tuple[int, str]:
        """(bytes of memory the system must hold, what they are) for a run to work at all."""
        cfg, p = self.store.config, self.params
        emb = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
        layer = p and (p - emb) // cfg.num_layers
        if system in ("hf-bf16", "hf-fp32"):
            w = p * (2 if system == "hf-bf16" else 4)
            return w + HF_OVERHEAD, f"every weight resident {w / GB:.2f} GB + runtime {HF_OVERHEAD / GB:.2f} GB"
        if system == "hf-offload":
            return HF_OVERHEAD + 2 * layer, f"runtime {HF_OVERHEAD / GB:.2f} GB + one layer in bf16"
        if system == "layer-stream":  # a layer is read (FP16) and converted: two copies at once
            w = emb * self.dtype_bytes + layer * (2 + self.dtype_bytes)
            return w + PY_OVERHEAD, (f"embeddings and head in {self.dtype} and one layer read and converted "
                                     f"{w / GB:.2f} GB + runtime {PY_OVERHEAD / GB:.2f} GB")
        if system.startswith("llama"):
            return LLAMA_OVERHEAD, "runtime, KV cache and buffers; weights are mapped from the file"
        return self._m2cache_needs(system)

    def _m2cache_needs(self, system: str) -> tuple[int, str]:
        """The engine's own smallest ``memory`` (:func:`m2cache.engine.memory.smallest_memory`), for a child
        holding M2CACHE_RUNTIME when the engine opens (the child measures its own and decides for real)."""
        from m2cache.engine.memory import smallest_memory
        from m2cache.model.policy import Policy

        name, store = self.row_policy(system) or "dense-fp16", self.row_store(system)
        policy = Policy(store.config.num_layers, store.num_neurons, self.shares(system))
        cfg = EngineConfig(memory=1, dtype=self.dtype, policy=name, preload=self.args.preload,
                           resident="full" if system == "m2cache-dense-fp16"
                           else row_options(system)[1].get("resident", self.args.resident))
        direct = not self.cuda and self.args.compute_from_dram and name != "dense-fp16"
        need, why = smallest_memory(store, cfg, policy, cpu_direct=direct,
                                    runtime=M2CACHE_RUNTIME + self.gate_copy_bytes(name, store))
        return need, why.replace("the process already holds", "the process holds about")

    def fits(self, system: str, row: dict[str, Any], limit: int | None) -> bool | None:
        """Its weights fit the limit without reading the disk per token: measured (the decode read under
        FITS_READ_BYTES a token off the disk; a GGUF file bigger than the limit can fit, since a token reads one
        row of its embedding table), else from what the row holds."""
        if limit is None:
            return True
        measured = row.get("disk_read_bytes_per_token")
        if measured is not None:
            return measured < FITS_READ_BYTES
        if system.startswith("llama-"):
            path = self.model.gguf.get(system.removeprefix("llama-"))
            return bool(path and path.is_file() and path.stat().st_size + LLAMA_OVERHEAD <= limit)
        if system in ("hf-bf16", "hf-fp32"):
            return row.get("status") == "ok"
        if system == "hf-offload":
            return row.get("status") == "ok" and "disk" not in (row.get("device_map_bytes") or {})
        if system == "layer-stream":
            return False
        st = row.get("m2cache_stats") or {}
        reads = (st.get("tiers") or {}).get("decode_read_bytes")
        return None if reads is None else reads == 0 and st.get("resident_form") != "stream"

    # ---- budgets and jobs ------------------------------------------------------------------------
    def budgets(self, system: str, limit: int | None) -> tuple[int | None, int | None]:
        """m2cache's budgets: the ones given; without a limit (in RAM: every system holds all its weights) a DRAM
        tier that keeps every layer the row's policy uses (``sizing.dram_to_keep_all``), else the defaults;
        under a limit None (the engine sizes them from ``memory``, the limit)."""
        store = self.row_store(system)
        if limit is None or not self.sizes_itself():
            hbm = parse_size(resolve_budget(self.args.hbm_budget, store), "--hbm-budget")
            dram = parse_size(resolve_budget(self.args.dram_budget, store), "--dram-budget")
            if limit is None and not self.args.dram_budget_set and not self.cuda:
                dram = max(dram, self._dram_to_keep_all(system, hbm))
            return hbm, dram
        return None, None

    def _dram_to_keep_all(self, system: str, hbm: int) -> int:
        from m2cache.engine.sizing import dram_to_keep_all
        from m2cache.model.policy import Policy

        name, store = self.row_policy(system) or "dense-fp16", self.row_store(system)
        policy = Policy(store.config.num_layers, store.num_neurons, self.shares(system))
        cfg = EngineConfig(hbm_budget=hbm, dram_budget=1, dtype=self.dtype, policy=name, preload=self.args.preload,
                           direct_io=self.args.direct_io)
        return dram_to_keep_all(store, cfg, policy, cpu_direct=self.args.compute_from_dram and name != "dense-fp16")

    def sizes_itself(self) -> bool:
        """m2cache rows size their engine from the limit (memory=), unless budgets are given or on CUDA,
        where the tiers are device and host memory, given by their budgets."""
        return not self.args.hbm_budget_set and not self.cuda

    def _skip(self, s: str) -> dict[str, Any] | None:
        bpw = self.bytes_per_weight(s)
        missing = _missing_bench_packages(s)
        if missing:
            return {"status": "skipped", "bytes_per_weight": bpw,
                    "reason": f"needs {', '.join(missing)}: pip install 'm2cache[bench]'"}
        if s.startswith("llama") and not have_llama():
            return {"status": "skipped", "reason": PEERS_HINT, "bytes_per_weight": bpw}
        if s.startswith("llama") and not self.model.gguf.get(s.removeprefix("llama-"), Path()).is_file():
            return {"status": "skipped", "reason": "no GGUF file (m2cache export-gguf)", "bytes_per_weight": bpw}
        return None

    def jobs(self, limit: int | None) -> tuple[list[Job], dict[str, dict[str, Any]]]:
        """The runnable jobs at ``limit``, and the rows of systems that do not run (with why)."""
        jobs, rows = [], {}
        for s in self.systems:
            skip = self._skip(s)
            if skip:
                rows[s] = skip
                continue
            need, what = self.needs(s)
            if limit is not None and need > limit:
                rows[s] = {"status": "does not fit", "needs_bytes": need, "needs": what,
                           "bytes_per_weight": self.bytes_per_weight(s)}
                continue
            jobs.append(self._job(s, limit))
        return jobs, rows

    def _job(self, s: str, limit: int | None) -> Job:
        hbm, dram = self.budgets(s, limit) if s.startswith("m2cache") else (0, 0)
        if limit:  # what the limit leaves after the runtime and one layer in flight
            offload = max(limit - HF_OVERHEAD - 2 * (self.params // self.store.config.num_layers), 0)
        else:  # the weight bytes m2cache holds on the compute device (on the CPU, the DRAM tier too)
            m_hbm, m_dram = self.budgets("m2cache", None)
            offload = self.resident_fp16 + (m_hbm or 0) + (0 if self.cuda else m_dram or 0)
        m2 = s.startswith("m2cache")
        a, opts = self.args, row_options(s)[1]
        return Job(system=s, store=str(self.row_store(s).path if m2 else self.model.store), hf=str(self.model.hf),
                   prompts=self.prompts, tokens=a.tokens, hbm_budget=hbm, dram_budget=dram, offload_memory=offload,
                   memory=limit if m2 and self.sizes_itself() else None,
                   resident="full" if s == "m2cache-dense-fp16" else opts.get("resident", a.resident), device=a.device,
                   m2cache_dtype=self.dtype, policy=self.row_policy(s) if m2 else None, direct_io=a.direct_io,
                   preload=a.preload, io_threads=a.io_threads, compute_from_dram=a.compute_from_dram,
                   lookahead=bool(int(opts.get("lookahead", a.lookahead))),
                   window=float(opts["window"]) if "window" in opts else None, gguf=str(self.model.gguf.get(s.removeprefix("llama-"), "")),
                   threads=a.threads, llama_repack=self.llama_repack(s, limit),
                   trace=f"{a.m2cache_trace}.{s.replace('/', '_')}" if a.m2cache_trace and m2 else None)

    def llama_repack(self, system: str, limit: int | None) -> bool:
        """llama.cpp as its users run it in each setting: with its repacking (weights copied into its own
        buffers, the faster kernels) where the file fits the limit with room for that copy, mapped (``mmap``)
        where it does not. The room: the repacked copy is anonymous memory beside the tensors left mapped (the
        output and embedding tables) and the load holds both for a while; measured on the grown model at 40%
        (2.08 GB), Q4_0's 1.59 GB file repacked read 415 MB a token off the disk (0.25 tokens/s) where mapped it
        read nothing (1.12)."""
        if self.args.llama_repack is not None:
            return self.args.llama_repack
        path = self.model.gguf.get(system.removeprefix("llama-"))
        if not (system.startswith("llama-") and path and path.is_file()):
            return False
        return limit is None or REPACK_ROOM * path.stat().st_size + LLAMA_OVERHEAD <= limit

    def paths(self) -> list[Path]:
        extra = [self.model.split] if self.model.split and self.model.split != self.model.store else []
        return [self.model.store, *extra, self.model.hf, *[p for p in self.model.gguf.values() if p.is_file()]]
