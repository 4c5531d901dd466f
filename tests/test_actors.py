"""The actors' one lifecycle (``m2cache.actors.base``): stop is ordered after earlier messages, every request still
waiting at teardown or sent after it gets a typed error, an actor with work of its own does it between messages,
and every channel counts what it sent; a step's path is decided before it runs (``step_plan``), so a layer asks
nothing of its weights on the way; a lower precision is served from a higher copy the same way in both tiers."""
from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import numpy as np
import pytest
import torch

from m2cache import Engine, EngineConfig
from m2cache.actors.base import Actor, fail
from m2cache.actors.precisions import serve_higher, served_at
from m2cache.errors import EngineClosedError, M2CacheError
from m2cache.model import cpu_kernels
from m2cache.model.family_attention import takes_family_path
from m2cache.model.llama import LayerWeights, ModelConfig, attention_route


@dataclasses.dataclass(frozen=True)
class Ask:
    value: int
    reply: asyncio.Future | None = None


class Recorder(Actor):
    """Answers each Ask with its value, after ``gate`` opens; fails those whose value is negative."""

    name = "recorder"

    def __init__(self, inbox_size: int = 8) -> None:
        super().__init__(inbox_size)
        self.seen: list[int] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def handle(self, msg: Any) -> None:
        await self.gate.wait()
        self.seen.append(msg.value)
        if msg.value < 0:
            fail(msg.reply, M2CacheError("negative"))
        elif msg.reply is not None:
            msg.reply.set_result(msg.value)


def ask(value: int) -> Ask:
    return Ask(value, asyncio.get_running_loop().create_future())


async def test_stop_is_handled_after_the_messages_sent_before_it() -> None:
    actor = Recorder()
    ch = actor.channel("test")
    async with asyncio.timeout(1):
        for v in range(3):
            await ch.send(Ask(v))
        await actor.stop()
        await actor.run()  # returns once Stop is taken
    assert actor.seen == [0, 1, 2] and actor.handled == 3 and actor.stopped


async def test_a_failed_request_fails_alone_and_the_actor_goes_on() -> None:
    actor = Recorder()
    ch = actor.channel("test")
    bad, good = ask(-1), ask(5)
    async with asyncio.timeout(1):
        task = asyncio.create_task(actor.run())
        await ch.send(bad)
        await ch.send(good)
        assert await good.reply == 5  # type: ignore[misc]
        with pytest.raises(M2CacheError, match="negative"):
            await bad.reply  # type: ignore[misc]
        await actor.stop()
        await task


async def test_requests_still_waiting_at_teardown_get_engine_closed_error() -> None:
    actor = Recorder()
    actor.gate.clear()  # the first request is taken and held: the others wait in the inbox
    ch = actor.channel("test")
    first, waiting = ask(1), [ask(2), ask(3)]
    async with asyncio.timeout(1):
        task = asyncio.create_task(actor.run())
        for msg in (first, *waiting):
            await ch.send(msg)
        await asyncio.sleep(0.01)
        task.cancel()  # the actor ends mid-message (as the engine's task group ends it on a crash)
        with pytest.raises(asyncio.CancelledError):
            await task
    for msg in waiting:
        assert isinstance(msg.reply.exception(), EngineClosedError)  # type: ignore[union-attr]


async def test_a_request_sent_once_the_actor_stopped_fails_at_once() -> None:
    actor = Recorder()
    ch = actor.channel("test")
    async with asyncio.timeout(1):
        await actor.stop()
        await actor.run()
        late, later = ask(1), ask(2)
        await ch.send(late)
        ch.send_nowait(later)
    for msg in (late, later):
        assert isinstance(msg.reply.exception(), EngineClosedError)  # type: ignore[union-attr]
    assert actor.seen == [] and ch.sent == 0


async def test_a_channel_counts_what_it_sent_and_a_full_inbox_refuses_send_nowait() -> None:
    actor = Recorder(inbox_size=2)
    a, b = actor.channel("a"), actor.channel("b")
    a.send_nowait(Ask(1))
    b.send_nowait(Ask(2))
    with pytest.raises(asyncio.QueueFull):
        a.send_nowait(Ask(3))
    assert (a.edge, a.sent, b.edge, b.sent) == ("a->recorder", 1, "b->recorder", 1)
    assert a.statistics() == {"sent": 1, "queued": 2, "max": 2}
    async with asyncio.timeout(1):
        task = asyncio.create_task(actor.run())
        await actor.stop()  # waits for room: the inbox is full until the actor takes a message
        await task
    assert actor.seen == [1, 2]


class Worker(Recorder):
    """Has ``todo`` pieces of work of its own, done one at a time between messages."""

    def __init__(self) -> None:
        super().__init__()
        self.todo = 0
        self.log: list[str] = []
        self.idle = asyncio.Event()

    async def handle(self, msg: Any) -> None:
        self.log.append(f"msg {msg.value}")
        self.todo += msg.value

    async def work(self) -> bool:
        if not self.todo:
            self.idle.set()
            return False
        self.todo -= 1
        self.log.append("work")
        await asyncio.sleep(0)
        return True


async def test_an_actor_with_work_does_it_between_messages_and_waits_when_it_has_none() -> None:
    actor = Worker()
    ch = actor.channel("test")
    async with asyncio.timeout(1):
        task = asyncio.create_task(actor.run())
        await ch.send(Ask(2))
        await ch.send(Ask(1))  # both queued before the actor ran: taken before any work
        await actor.idle.wait()
        assert actor.log == ["msg 2", "msg 1", "work", "work", "work"]
        actor.idle.clear()
        await ch.send(Ask(1))  # an idle actor wakes for a message
        await actor.idle.wait()
        await actor.stop()
        await task
    assert actor.log[-2:] == ["msg 1", "work"]


# ---- a step's path, decided once ---------------------------------------------------------------
def layer(D: int = 64, heads: int = 4, kv: int = 2, **extra: Any) -> tuple[ModelConfig, LayerWeights]:
    cfg = ModelConfig.from_hf(dict(model_type="llama", hidden_size=D, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=heads, num_key_value_heads=kv, vocab_size=32,
                                   rms_norm_eps=1e-5, hidden_act="silu", max_position_embeddings=64,
                                   rope_theta=10000.0, **extra))
    hd = D // heads
    g = torch.Generator().manual_seed(0)
    w = LayerWeights(torch.rand(D, generator=g), torch.randn((heads + 2 * kv) * hd, D, generator=g),
                     torch.randn(D, heads * hd, generator=g), torch.rand(D, generator=g))
    return cfg, w


@pytest.mark.parametrize("case", ["plain", "bias", "window", "bfloat16-rows", "transposed"])
def test_a_layer_s_route_takes_each_chunk_where_the_checks_it_replaces_would(case: str) -> None:
    cfg, w = layer(sliding_window=6) if case == "window" else layer()
    if case == "bias":
        w = dataclasses.replace(w, qkv_bias=torch.zeros(w.wqkv.shape[0]))  # type: ignore[union-attr]
    if case == "transposed":
        w = dataclasses.replace(w, wo=w.wo.t().contiguous().t())  # type: ignore[union-attr]
    dtype = torch.bfloat16 if case == "bfloat16-rows" else torch.float32
    route = attention_route(cfg, w, 0, torch.empty(1, cfg.hidden_size, dtype=dtype))
    for pos, T in [(0, 1), (4, 1), (5, 1), (6, 1), (0, 4), (3, 4), (30, 1)]:
        x = torch.zeros(T, cfg.hidden_size, dtype=dtype)
        want = "family" if takes_family_path(cfg, w, 0, pos, T) else \
            "kernel" if cpu_kernels.decode_attention_applies(x, w.wqkv, w.wo, w.attn_norm) else "torch"
        assert route.path(pos, T) == want, (pos, T)
    row = torch.zeros(1, cfg.hidden_size, dtype=dtype)
    assert route.fused_norm == cpu_kernels.decode_attention_applies(row, w.wqkv, w.wo, w.attn_norm, w.ffn_norm)
    if case == "plain" and cpu_kernels.available():
        assert route.path(3, 1) == "kernel" and route.path(3, 2) == "torch"


@pytest.mark.skipif(not cpu_kernels.available(), reason="no C compiler: no attention kernel to decide on")
async def test_a_decode_step_asks_nothing_of_the_weights_on_its_way(tiny_store, monkeypatch) -> None:
    asked: list[int] = []
    applies = cpu_kernels.decode_attention_applies

    def counted(*args):
        asked.append(1)
        return applies(*args)

    cfg = EngineConfig(hbm_budget="1MB", dram_budget="4MB", policy="gate:0.2,0.3,0.3", native_decode=False)
    async with asyncio.timeout(60):
        async with Engine.open(tiny_store.store, cfg) as engine:  # the routes are decided here
            monkeypatch.setattr(cpu_kernels, "decode_attention_applies", counted)
            got = [t async for t in engine.generate_ids([1, 2, 3], 6)]
    assert len(got) > 1 and engine.stats()["decode_tokens"] == len(got) - 1
    assert asked == []


# ---- a lower precision from a higher copy ------------------------------------------------------
def test_serve_higher_moves_what_a_higher_precision_holds_there_highest_first_and_counts_it() -> None:
    ids = {"fp16": np.array([1, 9]), "int8": np.array([2, 5, 10]), "int4": np.array([3, 6, 11])}
    held = {"fp16": {2, 3, 6}, "int8": {3, 6, 11}}

    def find(low: str, high: str, req: np.ndarray) -> np.ndarray | None:
        return np.isin(req, list(held[high])) if high in held else None

    out, moved = serve_higher(ids, find)
    assert {p: v.tolist() for p, v in out.items()} == {"fp16": [1, 2, 3, 6, 9], "int8": [5, 10, 11], "int4": []}
    assert moved == 4
    assert served_at("int4") == ("int4", "int8", "fp16") and served_at("fp16") == ("fp16",)
