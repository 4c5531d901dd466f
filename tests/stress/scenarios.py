"""Stress scenarios for the tiered engine, shared by ``tests/stress`` (``make stress``), the fast subset
in ``tests/test_faults.py`` and ``tools/stress_report.py``.

Each scenario opens a real engine over a simulated SSD (faults injected through the backend, never by
patching), runs requests, and returns an :class:`Outcome`: how many requests gave the fault-free
tokens, how many failed with a typed m2cache error, and whether anything hung, leaked a task or a
thread, went over a budget, or held the event loop. A :class:`Watchdog` task samples every 5 ms: the
event loop's lag, and the engine's tier accounting against its budgets.
"""
from __future__ import annotations

import asyncio
import contextlib
import random
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

from m2cache.engine.config import EngineConfig
from m2cache.engine.dense import DenseGenerator
from m2cache.engine.engine import Engine
from m2cache.errors import EngineClosedError, M2CacheError, SSDError
from m2cache.storage.reader import Store

SLOW_SSD = "latency=1ms,bandwidth=500MB/s,jitter=0.5,seed=1"
HBM_SHARE, DRAM_SHARE = 0.20, 0.30  # of the model's FP16 FFN bytes
TINY_LAYERS = 20  # with 20% / 30% budgets: 4 layers of HBM slots, 6 layers of DRAM (prefetch 3 fits)
PROMPT_TEXTS = (
    "The capital of France is", "Why is the sky blue?", "def fibonacci(n):", "Once upon a time",
    "The quick brown fox", "In the beginning", "Tell me about the moon.", "1, 2, 3, 4,",
)


# ---- models and their fault-free references --------------------------------------------------
@dataclass
class Model:
    """A store, its FP16 FFN bytes (what the budgets are shares of) and greedy dense references."""

    name: str
    store: Path
    ffn_bytes: int
    prompts: list[list[int]]
    dense: DenseGenerator
    _refs: dict[int, tuple[int, list[int]]] = field(default_factory=dict)  # prompt -> (asked, tokens)

    def reference(self, prompt: int, max_new_tokens: int) -> list[int]:
        """Greedy dense tokens for ``prompts[prompt]``; a shorter run is a prefix of a longer one."""
        asked, tokens = self._refs.get(prompt, (0, []))
        if asked < max_new_tokens:
            asked = max(max_new_tokens, 16)
            tokens = list(self.dense.generate_ids(self.prompts[prompt], asked))
            self._refs[prompt] = (asked, tokens)
        return tokens[:max_new_tokens]

    def request(self, prompt: int, max_new_tokens: int, **kw: Any) -> "Request":
        return Request(prompt, self.prompts[prompt], max_new_tokens, **kw)

    def config(self, ssd_sim: str | None = SLOW_SSD, **changes: Any) -> EngineConfig:
        base: dict[str, Any] = dict(hbm_budget=int(HBM_SHARE * self.ffn_bytes),
                                    dram_budget=int(DRAM_SHARE * self.ffn_bytes),
                                    policy="dense-fp16", ssd_sim=ssd_sim)
        base.update(changes)
        return EngineConfig(**base)


def ffn_fp16_bytes(store: Path) -> int:
    s = Store(store)
    return s.config.num_layers * s.layer_bytes("fp16")


def load_model(name: str, store: Path) -> Model:
    dense = DenseGenerator(str(store))
    prompts = [dense.tokenizer.encode(t, raw=True) for t in PROMPT_TEXTS]
    return Model(name, Path(store), ffn_fp16_bytes(store), prompts, dense)


async def tokens_of(engine: Engine, prompt: list[int], n: int) -> list[int]:
    """A request's generated token ids, all of them."""
    return [t async for t in engine.generate_ids(prompt, n)]


@contextlib.contextmanager
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine torch's thread
    pool can make a tiny matmul 100x slower; run with one (restored afterwards)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def build_tiny(root: Path, layers: int = TINY_LAYERS, seed: int = 3, **overrides: Any) -> Model:
    """A tiny random LLaMA (hidden 64, 128 neurons) with many layers, so that 20% / 30% budgets
    still hold whole layers; built with the test suite's own tiny-model writer."""
    tests_dir = str(Path(__file__).resolve().parents[1])
    if tests_dir not in sys.path:
        sys.path.insert(0, tests_dir)
    from conftest import make_tiny_model  # tests/conftest.py

    name = f"deep{layers}" + "".join(f"-{v}" for v in overrides.values())
    tiny = make_tiny_model(Path(root), name, seed=seed, num_hidden_layers=layers, **overrides)
    return load_model(f"tiny-{name}", tiny.store)


# ---- the watchdog ----------------------------------------------------------------------------
class Watchdog:
    """One task: every ``interval`` it records the event loop's lag and checks the engine's tiers
    (HBM pool bytes, DRAM FIFO + staging bytes, their peaks) against the configured budgets."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.worst_lag = 0.0
        self.samples = 0
        self.violations: list[str] = []
        self.engines: list[Engine] = []
        self._task: asyncio.Task | None = None

    def watch(self, engine: Engine) -> None:
        self.engines.append(engine)

    def check(self, engine: Engine) -> None:
        if not hasattr(engine, "dram"):
            return  # still opening
        # per tier the plan's budgets (on the CPU computing from DRAM, the device pool's budget is lent
        # to DRAM: plan_tiers); together never more than the two configured budgets
        total = int(engine.config.hbm_budget) + int(engine.config.dram_budget)
        hbm_budget = 0 if engine.plan.direct else int(engine.config.hbm_budget)
        dram_budget = engine.plan.dram_budget
        held = {"hbm pool": engine.hbm.pool_bytes, "dram held": engine.dram.held_bytes(),
                "dram peak": engine.dram.peak_total, "dram fifo peak": engine.dram.fifo.peak_bytes,
                "both tiers": engine.hbm.pool_bytes + engine.dram.held_bytes()}
        limits = {"hbm pool": hbm_budget, "dram held": dram_budget, "dram peak": dram_budget,
                  "dram fifo peak": dram_budget - engine.dram.staging_reserve, "both tiers": total}
        for what, n in held.items():
            if n > limits[what]:
                msg = f"{what} {n} > budget {limits[what]}"
                if msg not in self.violations:
                    self.violations.append(msg)

    def check_stats(self, engine: Engine) -> None:
        """The same, from ``engine.stats()`` (what a user sees)."""
        st = engine.stats()
        for tier in ("hbm", "dram"):
            for kind in ("held_bytes", "peak_bytes"):
                if st[kind][tier] > st["budgets"][tier]:
                    self.violations.append(f"stats {kind}[{tier}] {st[kind][tier]} > {st['budgets'][tier]}")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t0 = loop.time()
            await asyncio.sleep(self.interval)
            self.worst_lag = max(self.worst_lag, loop.time() - t0 - self.interval)
            self.samples += 1
            for engine in self.engines:
                self.check(engine)

    async def __aenter__(self) -> "Watchdog":
        self._task = asyncio.create_task(self._run(), name="stress-watchdog")
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        for engine in self.engines:
            self.check(engine)


# ---- outcomes --------------------------------------------------------------------------------
@dataclass
class Outcome:
    scenario: str
    requests: int = 0
    equal: int = 0  # completed with the fault-free tokens (cancelled ones: a prefix of them)
    failed_typed: int = 0  # ended by an m2cache error (its tokens so far a prefix of the reference)
    cancelled: int = 0
    wrong: int = 0  # tokens that differ from the reference, or an untyped error
    hung: int = 0
    leaked: int = 0  # asyncio tasks or m2cache threads alive after close
    budget_violations: int = 0
    worst_lag_ms: float = 0.0
    wall_s: float = 0.0
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def record_error(self, e: BaseException) -> None:
        if len(self.errors) < 8:
            self.errors.append(f"{type(e).__name__}: {e}")

    @property
    def clean(self) -> bool:
        """Nothing wrong, hung, leaked or over budget."""
        return not (self.wrong or self.hung or self.leaked or self.budget_violations)


@dataclass
class Request:
    prompt: int  # index into the model's prompts (the reference is keyed by it)
    ids: list[int]
    max_new_tokens: int
    cancel_after: int | None = None  # tokens to receive before giving up
    cancel_by: str = "task"  # "task": cancel the consumer task; "break": leave the `async for`
    tokens: list[int] = field(default_factory=list)
    error: BaseException | None = None
    outcome: str = "pending"  # equal | wrong | typed | cancelled | hung


async def consume(engine: Engine, req: Request, timeout: float) -> None:
    """Runs one request; ``req.outcome`` says how it ended. Never raises (but re-raises cancellation)."""
    try:
        async with asyncio.timeout(timeout):
            agen = engine.generate_ids(req.ids, req.max_new_tokens)
            async for tok in agen:
                req.tokens.append(tok)
                if req.cancel_after is not None and len(req.tokens) >= req.cancel_after:
                    if req.cancel_by == "break":
                        req.outcome = "cancelled"
                        break  # the generator is closed by the loop's async-generator finaliser
                    await asyncio.sleep(3600)  # the storm's canceller cancels this task here
        if req.outcome == "pending":
            req.outcome = "done"
    except TimeoutError:
        req.outcome = "hung"
    except asyncio.CancelledError:
        req.outcome = "cancelled"
        raise
    except M2CacheError as e:
        req.error, req.outcome = e, "typed"
    except Exception as e:  # noqa: BLE001 - an untyped error is what we count as wrong
        req.error, req.outcome = e, "untyped"


def score(out: Outcome, model: Model, reqs: list[Request]) -> None:
    """Classifies each finished request against the dense reference."""
    for r in reqs:
        out.requests += 1
        ref = model.reference(r.prompt, r.max_new_tokens)
        prefix_ok = r.tokens == ref[: len(r.tokens)]
        if r.outcome == "hung":
            out.hung += 1
        elif r.outcome == "done":
            if r.tokens == ref:
                out.equal += 1
            else:
                out.wrong += 1
                out.errors.append(f"request {r.prompt}/{r.max_new_tokens}: {r.tokens} != {ref}")
        elif r.outcome == "cancelled":
            out.cancelled += 1
            if not prefix_ok:
                out.wrong += 1
        elif r.outcome == "typed":
            assert r.error is not None
            out.failed_typed += 1
            out.record_error(r.error)
            if not prefix_ok:
                out.wrong += 1
        else:  # untyped error
            out.wrong += 1
            if r.error is not None:
                out.record_error(r.error)


def _m2cache_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("m2cache-") and t.is_alive()}


@contextlib.asynccontextmanager
async def harness(name: str, model: Model):
    """Outcome bookkeeping around a scenario: wall time, watchdog, leaked tasks and threads."""
    out = Outcome(name)
    tasks_before, threads_before = asyncio.all_tasks(), _m2cache_threads()
    t0 = time.perf_counter()
    dog = Watchdog()
    async with dog:
        yield out, dog
    for _ in range(5):  # let tasks that are already finishing run their last step
        await asyncio.sleep(0)
    me = asyncio.current_task()
    leaked = [t for t in asyncio.all_tasks() - tasks_before if t is not me and not t.done()]
    for t in leaked:
        t.cancel()
    if leaked:
        await asyncio.gather(*leaked, return_exceptions=True)
        out.notes.append("leaked tasks: " + ", ".join(t.get_name() for t in leaked))
    threads = _m2cache_threads() - threads_before
    if threads:
        out.notes.append("leaked threads: " + ", ".join(t.name for t in threads))
    out.leaked = len(leaked) + len(threads)
    out.budget_violations = len(dog.violations)
    out.notes.extend(dog.violations[:4])
    out.worst_lag_ms = dog.worst_lag * 1e3
    out.wall_s = time.perf_counter() - t0


@contextlib.asynccontextmanager
async def opened(model: Model, config: EngineConfig, dog: Watchdog, out: Outcome, close_timeout: float = 30.0):
    """An engine under the watchdog; closing it must finish within ``close_timeout`` (else: hung)."""
    engine = await Engine.open(model.store, config)
    dog.watch(engine)
    try:
        yield engine
    finally:
        try:
            async with asyncio.timeout(close_timeout):
                await engine.close()
        except TimeoutError:
            out.hung += 1
            out.notes.append("engine.close() hung")
        dog.check(engine)
        dog.check_stats(engine)


async def run_all(engine: Engine, reqs: list[Request], timeout: float) -> None:
    await asyncio.gather(*(consume(engine, r, timeout) for r in reqs))


# ---- scenarios -------------------------------------------------------------------------------
def _mixed_requests(rng: random.Random, model: Model, n: int, max_tokens: int) -> list[Request]:
    return [model.request(rng.randrange(len(model.prompts)), rng.randint(1, max_tokens)) for _ in range(n)]


async def fault_free(model: Model, *, n: int = 4, max_tokens: int = 8, seed: int = 0,
                     timeout: float = 60) -> Outcome:
    async with harness("fault-free", model) as (out, dog):
        reqs = _mixed_requests(random.Random(seed), model, n, max_tokens)
        async with opened(model, model.config(), dog, out) as engine:
            await run_all(engine, reqs, timeout)
        score(out, model, reqs)
    return out


async def _benign_fault(name: str, spec: str, model: Model, n: int, max_tokens: int, seed: int,
                        timeout: float) -> Outcome:
    """A fault the runtime must absorb: every request completes with the fault-free tokens, or (for a
    fault it cannot absorb, like a block corrupt on both reads) fails with a typed error."""
    async with harness(name, model) as (out, dog):
        reqs = _mixed_requests(random.Random(seed), model, n, max_tokens)
        async with opened(model, model.config(f"{SLOW_SSD},{spec}"), dog, out) as engine:
            await run_all(engine, reqs, timeout)
            ssd = engine.backend.stats()
            out.notes.append(", ".join(f"{k}={ssd[k]}" for k in ("failures", "corruptions", "stalls") if ssd[k]))
        score(out, model, reqs)
    return out


async def transient(model: Model, *, n: int = 4, max_tokens: int = 8, seed: int = 1, timeout: float = 60) -> Outcome:
    return await _benign_fault("transient fail=0.05", "fail=0.05", model, n, max_tokens, seed, timeout)


async def corrupt(model: Model, *, n: int = 4, max_tokens: int = 8, seed: int = 2, timeout: float = 60) -> Outcome:
    return await _benign_fault("corrupt=0.01", "corrupt=0.01", model, n, max_tokens, seed, timeout)


async def stall(model: Model, *, n: int = 4, max_tokens: int = 8, seed: int = 3, timeout: float = 120) -> Outcome:
    return await _benign_fault("stall=100ms@0.05", "stall=100ms@0.05", model, n, max_tokens, seed, timeout)


PERMANENT_LAYER = 1


async def permanent(model: Model, *, n: int = 4, max_tokens: int = 8, seed: int = 4, timeout: float = 60) -> Outcome:
    """A layer file gone bad for good: every request needs it (dense policy), so every request fails
    with a typed SSDError naming the file, layer and neurons; the engine then closes cleanly."""
    spec = f"fail=1,fail_permanent=1,fail_path=*L{PERMANENT_LAYER:03d}.fp16*"
    async with harness("permanent (one fp16 layer)", model) as (out, dog):
        reqs = _mixed_requests(random.Random(seed), model, n, max_tokens)
        async with opened(model, model.config(f"{SLOW_SSD},{spec}"), dog, out) as engine:
            await run_all(engine, reqs, timeout)
        score(out, model, reqs)
        for r in reqs:
            if r.outcome == "typed" and not _names_fault(r.error, "fp16"):
                out.wrong += 1
                out.notes.append(f"error does not name file/layer/neurons: {r.error}")
        out.notes.append("every request needs layer 1 FP16: none can be isolated; the engine closed cleanly")
    return out


def _names_fault(error: BaseException | None, precision: str) -> bool:
    text = str(error)
    return (isinstance(error, SSDError) and f"L{PERMANENT_LAYER:03d}.{precision}" in text
            and f"layer {PERMANENT_LAYER}" in text and "neurons" in text)


async def permanent_isolated(model: Model, *, n: int = 6, max_tokens: int = 6, seed: int = 5,
                             timeout: float = 60, lookahead: bool = False) -> Outcome:
    """A fault on one layer's INT4 file, under a mixed-precision policy: prefill (dense FP16) never
    reads it, so prompt-only requests (1 token) succeed with the dense token while decode requests fail
    with a typed SSDError naming it — on the same engine, at the same time. With ``lookahead`` the
    failing layer's request is made while the layer before it computes, and the next one's is in flight
    when it fails."""
    spec = f"fail=1,fail_permanent=1,fail_path=*L{PERMANENT_LAYER:03d}.int4*"
    async with harness("permanent (int4, isolated)", model) as (out, dog):
        rng = random.Random(seed)
        reqs = [model.request(rng.randrange(len(model.prompts)), 1 if i % 2 else max_tokens) for i in range(n)]
        cfg = model.config(f"{SLOW_SSD},{spec}", policy="oracle:0.1,0.2,0.2", lookahead=lookahead)
        async with opened(model, cfg, dog, out) as engine:
            await run_all(engine, reqs, timeout)
            after = model.request(0, 1)  # the engine is still usable for what does not need the bad file
            await consume(engine, after, timeout)
            reqs.append(after)
        for r in reqs:
            if r.max_new_tokens > 1:  # sparse decode tokens are not the dense ones: only the error counts
                out.requests += 1
                if r.outcome == "typed" and _names_fault(r.error, "int4"):
                    out.failed_typed += 1
                    out.record_error(r.error)  # type: ignore[arg-type]
                elif r.outcome == "hung":
                    out.hung += 1
                else:
                    out.wrong += 1
                    out.notes.append(f"decode request: {r.outcome} {r.error!r}")
            else:
                score(out, model, [r])
    return out


async def cancel_storm(model: Model, *, n: int = 12, max_tokens: int = 10, seed: int = 6,
                       timeout: float = 60) -> Outcome:
    """Consumers cancelled at seeded random points (half by cancelling the task at a random time,
    half by leaving the ``async for`` after a random number of tokens); then a request must still
    give the right tokens, and no request may be left running in the executor."""
    async with harness("cancellation storm", model) as (out, dog):
        rng = random.Random(seed)
        reqs: list[Request] = []
        async with opened(model, model.config(), dog, out) as engine:
            tasks = []
            for i in range(n):
                r = model.request(rng.randrange(len(model.prompts)), max_tokens)
                if i % 2:
                    r.cancel_by, r.cancel_after = "break", rng.randint(1, max_tokens - 1)
                reqs.append(r)
                tasks.append(asyncio.create_task(consume(engine, r, timeout)))
            delays = [rng.uniform(0.0, 0.05 * max_tokens) for _ in range(n)]

            async def cancel_later(task: asyncio.Task, delay: float) -> None:
                await asyncio.sleep(delay)
                task.cancel()

            killers = [asyncio.create_task(cancel_later(t, d)) for t, d, r in zip(tasks, delays, reqs)
                       if r.cancel_by == "task"]
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.gather(*killers)
            after = model.request(0, max_tokens)
            await consume(engine, after, timeout)
            reqs.append(after)
            await _settle(engine)
            if engine.executor.active or engine.executor.pending:
                out.wrong += 1
                out.notes.append(f"{len(engine.executor.active)} cancelled request(s) still run in the executor")
        score(out, model, reqs)
    return out


async def _settle(engine: Engine, seconds: float = 2.0) -> None:
    """Waits (bounded) until the executor has dropped every cancelled request."""
    deadline = time.perf_counter() + seconds
    while (engine.executor.active or engine.executor.pending) and time.perf_counter() < deadline:
        await asyncio.sleep(0.01)


async def concurrent(model: Model, *, n: int = 32, max_tokens: int = 16, seed: int = 7,
                     timeout: float = 120) -> Outcome:
    """``n`` requests of random prompts and lengths at once: each gives its own dense tokens."""
    async with harness(f"{n} concurrent", model) as (out, dog):
        reqs = _mixed_requests(random.Random(seed), model, n, max_tokens)
        async with opened(model, model.config(), dog, out) as engine:
            await run_all(engine, reqs, timeout)
        score(out, model, reqs)
    return out


async def shutdown_inflight(model: Model, *, n: int = 6, max_tokens: int = 12, seed: int = 8,
                            timeout: float = 60) -> Outcome:
    """``engine.close()`` while SSD reads are in flight: every request ends promptly, with its tokens
    or EngineClosedError, and close() returns."""
    async with harness("close with reads in flight", model) as (out, dog):
        rng = random.Random(seed)
        reqs = _mixed_requests(rng, model, n, max_tokens)
        for r in reqs:
            r.max_new_tokens = max_tokens
        cfg = model.config("latency=5ms,bandwidth=200MB/s,jitter=0.5,seed=8,stall=50ms@0.2")
        async with opened(model, cfg, dog, out) as engine:
            tasks = [asyncio.create_task(consume(engine, r, timeout)) for r in reqs]
            deadline = time.perf_counter() + timeout
            first = rng.randint(0, 3)  # close at a seeded moment: in prefill, or after a few tokens
            while sum(len(r.tokens) for r in reqs) < first and time.perf_counter() < deadline:
                await asyncio.sleep(0.001)
            await asyncio.sleep(rng.uniform(0, 0.03))
            in_flight = 0
            for _ in range(2000):  # wait for a moment when the reader has reads in flight
                in_flight = engine.reader.io_threads * 2 - engine.reader.slots._value
                if in_flight:
                    break
                await asyncio.sleep(0.0005)
            out.notes.append(f"reads in flight at close: {in_flight}")
            t0 = time.perf_counter()
            await engine.close()
            out.notes.append(f"close took {1e3 * (time.perf_counter() - t0):.0f} ms")
            await asyncio.gather(*tasks)
            await consume(engine, extra := model.request(0, 2), timeout)
            if not isinstance(extra.error, EngineClosedError):
                out.wrong += 1
                out.notes.append(f"generate after close: {extra.outcome} {extra.error!r}")
        for r in reqs:
            if r.outcome == "typed" and not isinstance(r.error, EngineClosedError):
                out.notes.append(f"unexpected error at close: {r.error!r}")
        score(out, model, reqs)
    return out


SCENARIOS: dict[str, Callable[..., Awaitable[Outcome]]] = {
    "fault-free": fault_free,
    "transient": transient,
    "permanent": permanent,
    "permanent-isolated": permanent_isolated,
    "corrupt": corrupt,
    "stall": stall,
    "cancel-storm": cancel_storm,
    "concurrent": concurrent,
    "shutdown": shutdown_inflight,
}

COLUMNS = ("scenario", "requests", "equal", "failed typed", "cancelled", "hung", "leaked", "over budget",
           "worst lag ms", "wall s")


def table(outcomes: list[Outcome]) -> str:
    rows = [COLUMNS] + [(o.scenario, o.requests, o.equal, o.failed_typed, o.cancelled, o.hung, o.leaked,
                         o.budget_violations, f"{o.worst_lag_ms:.1f}", f"{o.wall_s:.1f}") for o in outcomes]
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(COLUMNS))]
    lines = [" | ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def check_each_ffn(engine: Engine, store: Store, errors: list[float], also: Callable | None = None) -> None:
    """From now on every layer FFN the engine computes is compared with the exact product of the rows it
    was given (``ready.ids``: the store's bundles at their precision, dequantised to FP32); the relative
    errors go to ``errors``. ``also(ready, prefill)`` may check more of each layer's answer."""
    import torch

    from m2cache.model.llama import activation, ffn_bundles
    from m2cache.storage.reader import PlainBackend

    from m2cache.model import kernel_reference

    act = activation(store.config.hidden_act)
    ex = engine.executor.ffn
    ffn = ex.compute

    def checked(h, ready, prefill: bool):
        out = ffn(h, ready, prefill)
        if also is not None:
            also(ready, prefill)
        kernels = ex.kernels_for(h.shape[0], prefill)  # else torch's products, with h as it is

        def product(p: str, ids):  # the rows' FFN as torch computes it, or as the kernels round it
            raw = store.read_layer(ready.layer, p, PlainBackend())[torch.from_numpy(ids)]
            if kernels:
                return kernel_reference.ffn(h.float(), p, raw, store.parts, store.hidden, store.groups, act)
            return ffn_bundles(h.float(), store.decode(p, raw, torch.float32), act)

        ref = sum(product(p, ids) for p, ids in ready.ids.items() if len(ids))
        errors.append(float((out.float() - ref).abs().max() / ref.abs().max()))
        return out

    engine.executor.ffn.compute = checked
