"""The actor skeleton, one lifecycle for every actor: setup -> loop over a bounded inbox -> teardown (pykka's shape).

An actor's inbox is its own; others reach it only through a :class:`Channel`, the sending end the engine gave
them when it wired the actors (anyio's memory object streams: bounded, ``send`` waits for room, ``send_nowait``
raises ``asyncio.QueueFull``). Stop is a message in the same inbox (``Actor.stop``), so it is ordered after
earlier work. A message whose handling fails with an m2cache error fails that message's request only; any
other exception is a bug, ends the actor, and the engine's supervisor closes the engine with that cause. In
teardown every request still waiting in the inbox gets a typed error (``EngineClosedError``), and so does
every request sent once the actor has stopped.

The loop takes a message, handles it, and between messages lets the actor ``work``: an actor with work of its
own (the executor's steps) does one piece of it whenever its inbox is empty, and waits for a message only when
it has none (``idle_timeout`` bounds the wait where idleness ends by the clock).
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from m2cache.actors.messages import Stop
from m2cache.errors import EngineClosedError

log = logging.getLogger(__name__)


class Actor:
    name = "actor"

    def __init__(self, inbox_size: int) -> None:
        self._inbox: asyncio.Queue[Any] = asyncio.Queue(maxsize=max(inbox_size, 1))
        self.channels: list[Channel] = []  # the sending ends given out (``channel``), one per sender
        self.ready = asyncio.Event()
        self.handled = 0
        self._tasks: set[asyncio.Task] = set()  # helper tasks this actor owns (awaits of replies)
        self.stopped = False  # set when the loop ends: later sends fail their request at once

    # ---- what an actor defines -------------------------------------------------------------------
    async def setup(self) -> None:
        """Acquire resources; runs before ``ready`` is set."""

    async def handle(self, msg: Any) -> None:
        raise NotImplementedError

    async def work(self) -> bool:
        """One piece of the actor's own work, run while its inbox is empty; False when it has none (it then
        waits for a message)."""
        return False

    def idle_timeout(self) -> float | None:
        """Seconds an idle actor waits for a message before it looks for work again (None: no bound)."""
        return None

    async def teardown(self, error: BaseException | None) -> None:
        """Release resources; fail every request still waiting here."""

    # ---- the lifecycle -----------------------------------------------------------------------------
    def channel(self, sender: str) -> Channel:
        """The sending end of this actor's inbox for ``sender`` (wired once, by the engine)."""
        ch = Channel(self, sender)
        self.channels.append(ch)
        return ch

    async def stop(self, reason: str = "close") -> None:
        """Stop, as a message in the inbox: the actor ends once it has handled what was sent before."""
        if not self.stopped:
            await self._inbox.put(Stop(reason))

    async def run(self) -> None:
        error: BaseException | None = None
        try:
            await self.setup()
            self.ready.set()
            await self._loop()
        except BaseException as e:  # including cancellation: teardown must still run
            error = e
            raise
        finally:
            self.stopped = True
            for task in list(self._tasks):
                task.cancel()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            self._refuse_inbox(error)
            await self.teardown(error)

    async def _loop(self) -> None:
        idle = False
        while True:
            msg = await self._next(idle)
            if msg is None:  # the inbox is empty (or the idle wait timed out): the actor's own work
                idle = not await self.work()
                continue
            if isinstance(msg, Stop):
                return
            await self.handle(msg)
            self.handled += 1
            idle = False

    async def _next(self, wait: bool) -> Any:
        """The next message; None at once when there is none and ``wait`` is False, or when an idle wait ends."""
        if not wait:
            try:
                return self._inbox.get_nowait()
            except asyncio.QueueEmpty:
                return None
        timeout = self.idle_timeout()
        if timeout is None:
            return await self._inbox.get()
        try:
            async with asyncio.timeout(timeout):
                return await self._inbox.get()
        except TimeoutError:
            return None

    def spawn(self, coro) -> asyncio.Task:
        """A child task owned by this actor, cancelled at teardown (never outlives the actor)."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _refuse_inbox(self, error: BaseException | None) -> None:
        while not self._inbox.empty():
            msg = self._inbox.get_nowait()
            refuse(msg, EngineClosedError(f"the engine closed before {self.name} handled {type(msg).__name__} "
                                          f"({error or 'close'})"))

    def stats(self) -> dict[str, Any]:
        return {"handled": self.handled, "inbox": self._inbox.qsize()}


class Channel:
    """The sending end of an actor's bounded inbox, held by one sender; counts what it sent (the hops between
    actors, ``engine.stats()["messages"]``)."""

    def __init__(self, actor: Actor, sender: str) -> None:
        self.actor, self.sender = actor, sender
        self.sent = 0

    @property
    def edge(self) -> str:
        return f"{self.sender}->{self.actor.name}"

    async def send(self, msg: Any) -> None:
        """Queues ``msg``, waiting for room; once the actor has stopped, fails its request instead (nobody would
        read it)."""
        actor = self.actor
        if not actor.stopped:
            await actor._inbox.put(msg)
            self.sent += 1
        if actor.stopped:  # stopped before, or while this send waited for room
            actor._refuse_inbox(None)
            refuse(msg, EngineClosedError(f"the engine closed before {actor.name} handled {type(msg).__name__}"))

    def send_nowait(self, msg: Any) -> None:
        """Queues ``msg`` at once, or raises ``asyncio.QueueFull``; a stopped actor fails its request."""
        actor = self.actor
        if actor.stopped:
            refuse(msg, EngineClosedError(f"the engine closed before {actor.name} handled {type(msg).__name__}"))
            return
        actor._inbox.put_nowait(msg)
        self.sent += 1

    def statistics(self) -> dict[str, int]:
        return {"sent": self.sent, "queued": self.actor._inbox.qsize(), "max": self.actor._inbox.maxsize}


def refuse(msg: Any, exc: BaseException) -> None:
    """A message that waits for an answer gets ``exc`` instead: its ``reply`` future fails, or a request with
    an answer of its own (``Submit``) ends with it."""
    own = getattr(msg, "refuse", None)
    if own is not None:
        own(exc)
    else:
        fail(getattr(msg, "reply", None), exc)


def fail(fut: asyncio.Future | None, exc: BaseException) -> None:
    if fut is not None and not fut.done():
        fut.set_exception(exc)
        fut.exception()  # marks it retrieved: a request that gave up must not log "never retrieved"


def resolve(fut: asyncio.Future | None, value: Any) -> None:
    if fut is not None and not fut.done():
        fut.set_result(value)
