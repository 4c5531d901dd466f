"""The systems `m2cache bench` measures, each run in its own child process (one system, one run).

`python -m m2cache.bench.harness --child JOB OUT` calls :func:`child_main`: it runs the job's system and writes
its figures (decode timing, bytes read, peak RSS) as JSON for the parent to aggregate.
"""
from __future__ import annotations

import json
import resource
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from m2cache.bench.memlimit import seen_by_this_process
from m2cache.engine.config import EngineConfig
from m2cache.figures import Counters, figures
from m2cache.formats.config import ModelConfig

# imports inside functions: each system imports what it runs, so a child holds torch only when its system
# runs on it

MB = 1e6

@dataclass
class Job:
    """What one child process runs; crosses the process boundary as JSON."""

    system: str
    store: str
    hf: str
    prompts: list[list[int]]
    tokens: int
    hbm_budget: int | None  # m2cache rows: None = sized from ``memory``
    dram_budget: int | None
    offload_memory: int
    memory: int | None = None  # m2cache rows: the limit the engine sizes itself from (EngineConfig.memory)
    resident: str = "auto"  # m2cache rows: EngineConfig.resident
    device: str = "cpu"
    m2cache_dtype: str = "float32"
    policy: str | None = None
    direct_io: bool = False  # m2cache rows: read the store with O_DIRECT (no second copy in the page cache)
    preload: str = "auto"
    io_threads: int = 4  # m2cache rows: threads serving SSD reads
    compute_from_dram: bool = True  # m2cache rows, CPU: False keeps the device pool's copy path (CUDA's)
    lookahead: bool = False  # m2cache rows: EngineConfig.lookahead
    window: float | None = None  # m2cache rows: EngineConfig.window (None: its default)
    trace: str | None = None  # m2cache rows: write the run's trace here
    gguf: str | None = None  # llama.cpp rows: the GGUF file
    threads: int = 2  # llama.cpp rows: n_threads
    llama_repack: bool = False  # llama.cpp rows: its extra buffer types (weights repacked into anonymous memory)
    extra: dict[str, Any] = field(default_factory=dict)


# ==== the child: one system, one run ===========================================================
def _io_read_bytes() -> int | None:
    try:
        with open("/proc/self/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("read_bytes"))
    except (OSError, StopIteration, ValueError):
        return None


class _Clock:
    """Times one request: time to first token, then the decode (every token after the first)."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.times: list[float] = []
        self.tokens: list[int] = []
        self.io_first: int | None = None

    def token(self, tok: int) -> None:
        self.times.append(time.perf_counter())
        self.tokens.append(int(tok))
        if len(self.times) == 1:
            self.io_first = _io_read_bytes()

    def result(self) -> dict[str, Any]:
        io_end, n = _io_read_bytes(), len(self.times)
        disk = io_end - self.io_first if io_end is not None and self.io_first is not None else None
        return {"ttft_s": self.times[0] - self.t0 if n else None, "decode_tokens": max(0, n - 1),
                "decode_s": self.times[-1] - self.times[0] if n else 0.0, "disk_read_bytes": disk,
                "tokens": self.tokens}


def _run_m2cache(job: Job) -> dict[str, Any]:
    import asyncio

    from m2cache.engine.engine import Engine
    from m2cache.engine.metrics import engine_counters

    cfg = EngineConfig(hbm_budget=job.hbm_budget, dram_budget=job.dram_budget, memory=job.memory,
                       resident=job.resident, policy=job.policy,
                       device=job.device, dtype=job.m2cache_dtype, direct_io=job.direct_io, preload=job.preload,
                       io_threads=job.io_threads, trace=job.trace, compute_from_dram=job.compute_from_dram,
                       lookahead=job.lookahead, **({} if job.window is None else {"window": job.window}))

    async def go() -> dict[str, Any]:
        t0 = time.perf_counter()
        async with Engine.open(job.store, cfg) as engine:
            out: dict[str, Any] = {"load_s": time.perf_counter() - t0, "requests": []}
            decode = Counters()  # what the engine counted after each request's first token
            for ids in job.prompts:
                clock = _Clock()
                async for tok in engine.generate_ids(ids, job.tokens):
                    clock.token(tok)
                    if len(clock.tokens) == 1:
                        first = engine_counters(engine)
                decode += engine_counters(engine) - first
                out["requests"].append(clock.result())
            st = engine.stats()
        out["stats"] = {k: st[k] for k in ("policy", "resident_form", "bytes_per_token", "hit_ratio", "stall_fraction",
                                           "stall_s", "peak_bytes", "budgets", "tiers") if k in st}
        # the engine's figures over decode alone: its tokens are the decode tokens
        dec = figures(decode, device=st["device"])
        out["stats"]["decode"] = {k: dec[k] for k in ("decode_tokens", "bytes_per_token", "stall_fraction",
                                                       "hit_ratio", "reads_per_token", "bytes_per_read")}
        per_token = dec["bytes_per_token"] if decode.tokens else {e: None for e in dec["bytes_per_token"]}
        out["stats"]["decode_bytes_per_token"] = per_token
        out["moved_bytes_per_token"] = per_token["dram_to_hbm"]
        out["ssd_bytes_per_token"] = per_token["ssd_to_dram"]
        return out

    return asyncio.run(go())


def _hf_generate(model, job: Job, device) -> list[dict[str, Any]]:
    import torch
    from transformers.generation.streamers import BaseStreamer

    class Timer(BaseStreamer):  # generate() calls put() with the prompt first, then each new token
        def __init__(self) -> None:
            self.clock, self.prompt_seen = _Clock(), False

        def put(self, value) -> None:
            if not self.prompt_seen:
                self.prompt_seen = True
                return
            self.clock.token(int(value.reshape(-1)[0]))

        def end(self) -> None:
            pass

    out = []
    eos = model.config.eos_token_id
    with torch.inference_mode():
        for ids in job.prompts:
            x = torch.tensor([ids], device=device)
            timer = Timer()
            timer.clock.t0 = time.perf_counter()
            model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=job.tokens,
                           do_sample=False, streamer=timer, pad_token_id=eos if isinstance(eos, int) else 0)
            out.append(timer.clock.result())
    return out


def _run_hf(job: Job) -> dict[str, Any]:
    import torch
    from transformers import LlamaForCausalLM

    dtype = torch.float32 if job.system == "hf-fp32" else torch.bfloat16
    t0 = time.perf_counter()
    extra: dict[str, Any] = {}
    if job.system == "hf-offload":
        gpu = job.device.startswith("cuda")
        max_memory: dict[Any, int] = ({0: job.offload_memory, "cpu": job.extra.get("host_memory", 200 << 30)}
                                      if gpu else {"cpu": job.offload_memory})
        folder = tempfile.mkdtemp(prefix="m2cache-offload-")
        model = LlamaForCausalLM.from_pretrained(job.hf, dtype=dtype, device_map="auto", max_memory=max_memory,
                                                 offload_folder=folder)
        extra["device_map_bytes"] = _device_map_bytes(model)
        extra["max_memory"] = {str(k): v for k, v in max_memory.items()}
        compute = "cuda:0" if gpu else "cpu"
        on_compute = extra["device_map_bytes"].get("0" if gpu else "cpu", 0)
        extra["moved_bytes_per_token"] = sum(extra["device_map_bytes"].values()) - on_compute
    else:
        where: dict[str, Any] = {"device_map": {"": job.device}} if job.device.startswith("cuda") else {}
        model = LlamaForCausalLM.from_pretrained(job.hf, dtype=dtype, **where)
        compute = job.device
        extra["moved_bytes_per_token"] = 0
    model.eval()
    extra["load_s"] = time.perf_counter() - t0
    return extra | {"requests": _hf_generate(model, job, compute)}


def _device_map_bytes(model) -> dict[str, int]:
    """Weight bytes per device of accelerate's map ('disk', 'cpu', 0), tied weights counted once."""
    seen: set[int] = set()
    out: dict[str, int] = {}
    device_map = getattr(model, "hf_device_map", None) or {"": str(model.device)}  # unset when one device holds all
    for name, dev in device_map.items():
        mod = model.get_submodule(name) if name else model
        n = 0
        for p in mod.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                n += p.numel() * p.element_size()
        out[str(dev)] = out.get(str(dev), 0) + n
    return out


def _run_layer_stream(job: Job) -> dict[str, Any]:
    """AirLLM's way in a few lines: embeddings, final norm and LM head stay resident; every decoder
    layer is read from the checkpoint (safetensors) when the forward reaches it, then dropped."""
    import torch
    import torch.nn.functional as F
    from safetensors import safe_open

    from m2cache.model.llama import KVCache, LayerWeights, Rotary, activation, attention_block, rms_norm

    hf = Path(job.hf)
    cfg = ModelConfig.from_hf(json.loads((hf / "config.json").read_text()))
    index = hf / "model.safetensors.index.json"
    where = ({n: hf / f for n, f in json.loads(index.read_text())["weight_map"].items()} if index.is_file()
             else _names_in(hf / "model.safetensors"))
    dev, dtype = torch.device(job.device), getattr(torch, job.m2cache_dtype)
    moved = [0]

    def load(names: list[str]) -> list[torch.Tensor]:
        """The named tensors, read from their files now (one open per file), in ``names``' order."""
        got: dict[str, torch.Tensor] = {}
        for path in {where[n] for n in names}:
            with safe_open(str(path), framework="pt") as f:
                for n in (n for n in names if where[n] == path):
                    t = f.get_tensor(n)
                    moved[0] += t.numel() * t.element_size()
                    got[n] = t.to(dev, dtype)
        return [got[n] for n in names]

    t0 = time.perf_counter()
    top = load(["model.embed_tokens.weight", "model.norm.weight"]
               + ([] if cfg.tie_word_embeddings else ["lm_head.weight"]))
    embed, norm, head = top[0], top[1], top[-1] if not cfg.tie_word_embeddings else top[0]
    rope, act = Rotary(cfg, dev), activation(cfg.hidden_act)
    parts = ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")

    @torch.inference_mode()
    def forward(ids: list[int], kv: KVCache) -> int:
        x = embed[torch.tensor(ids, device=dev)]  # [T, D]
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            w = load([p + n + ".weight" for n in parts])
            x = attention_block(cfg, LayerWeights(w[0], torch.cat(w[1:4]), w[4], w[5]), x, i, kv, kv.length, rope)
            h = rms_norm(x, w[5], cfg.rms_norm_eps)
            x = x + F.linear(act(F.linear(h, w[6])) * F.linear(h, w[7]), w[8])
        kv.length += len(ids)
        return int(F.linear(rms_norm(x[-1:], norm, cfg.rms_norm_eps), head)[0].argmax())

    out: dict[str, Any] = {"load_s": time.perf_counter() - t0, "requests": []}
    eos = set(cfg.eos_token_ids)
    for ids in job.prompts:
        kv = KVCache(cfg, dtype, dev, capacity=len(ids) + job.tokens)
        clock = _Clock()
        tok = forward(ids, kv)
        moved[0] = 0  # count the decode's reads only
        for _ in range(job.tokens):
            clock.token(tok)
            if tok in eos or len(clock.tokens) == job.tokens:
                break
            tok = forward([tok], kv)
        out["requests"].append(clock.result() | {"moved_bytes": moved[0]})
    n = sum(r["decode_tokens"] for r in out["requests"])
    out["moved_bytes_per_token"] = sum(r["moved_bytes"] for r in out["requests"]) / n if n else None
    return out


def _run_llama(job: Job) -> dict[str, Any]:
    """llama.cpp through llama-cpp-python as its users run it: mmap (its default), ``job.threads``
    threads, greedy, the prompt's token ids fed directly (the GGUF's vocabulary is the store's).

    Unless ``job.llama_repack``, its extra buffer types are off: with them this build copies the weights
    into anonymous memory at load (F16: 3.4 GB of RssAnon for a 3.8 GB file, so nothing is mapped any
    more) and its AMX path dies with SIGILL on Q4_0/Q8_0 on these VMs."""
    import llama_cpp  # the parent skips this row when llama-cpp-python is missing
    import llama_cpp.llama as llama_mod

    if not job.llama_repack:  # Llama() reads the defaults and loads at once: set the field there
        defaults = llama_cpp.llama_model_default_params

        def no_repack():
            params = defaults()
            params.use_extra_bufts = False
            return params

        llama_mod.llama_cpp.llama_model_default_params = no_repack  # type: ignore[attr-defined]
    Llama = llama_mod.Llama
    assert job.gguf, "the parent gives llama.cpp rows their GGUF file"
    t0 = time.perf_counter()
    n_ctx = max(len(p) for p in job.prompts) + job.tokens + 8
    llm = Llama(model_path=job.gguf, n_threads=job.threads, n_threads_batch=job.threads, use_mmap=True,
                n_ctx=n_ctx, n_batch=max(64, n_ctx), verbose=False)
    out: dict[str, Any] = {"load_s": time.perf_counter() - t0, "requests": [], "moved_bytes_per_token": 0}
    for ids in job.prompts:
        clock = _Clock()
        for tok in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            clock.token(tok)
            if len(clock.tokens) >= job.tokens or tok == llm.token_eos():
                break
        out["requests"].append(clock.result())
    return out


def _names_in(path: Path) -> dict[str, Path]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {n: path for n in f.keys()}


RUNNERS: dict[str, Callable[[Job], dict[str, Any]]] = {
    "m2cache": _run_m2cache, "hf-bf16": _run_hf, "hf-fp32": _run_hf, "hf-offload": _run_hf,
    "layer-stream": _run_layer_stream, "llama": _run_llama,
}


def runner(system: str) -> Callable[[Job], dict[str, Any]]:
    """m2cache rows (its policies, dense-fp16) share one runner, llama.cpp's types another."""
    for family in ("m2cache", "llama"):
        if system.startswith(family):
            return RUNNERS[family]
    return RUNNERS[system]


def child_main(job_file: str, out_file: str) -> int:
    job = Job(**json.loads(Path(job_file).read_text()))
    res: dict[str, Any] = {"system": job.system, "seen": seen_by_this_process()}
    try:
        res |= runner(job.system)(job)
        res["ok"] = True
    except Exception as e:  # reported in the table; the other systems go on
        import traceback

        res |= {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
    res["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if job.device.startswith("cuda"):
        import torch

        res["peak_device_bytes"] = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    Path(out_file).write_text(json.dumps(res, default=_plain))
    return 0


def _plain(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)

