"""The actor skeleton: setup -> loop over a bounded inbox -> teardown (pykka's shape).

Stop is a message in the same inbox, so it is ordered after earlier work. A message whose handling
fails with an m2cache error fails that message's reply future only; any other exception is a bug,
ends the actor, and the engine's supervisor closes the engine with that cause.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from m2cache.actors.messages import Stop
from m2cache.errors import EngineClosedError

log = logging.getLogger(__name__)


class Inbox(asyncio.Queue):
    """An actor's bounded inbox. ``received`` counts the messages put in (Stop aside): the hops the actor
    was sent, whoever put them (``engine.stats()["messages"]``)."""

    def __init__(self, maxsize: int) -> None:
        super().__init__(maxsize)
        self.received = 0

    def put_nowait(self, item: Any) -> None:  # ``put`` ends here too, once there is room
        super().put_nowait(item)
        if not isinstance(item, Stop):
            self.received += 1


class Actor:
    name = "actor"

    def __init__(self, inbox_size: int) -> None:
        self.inbox: Inbox = Inbox(max(inbox_size, 1))
        self.ready = asyncio.Event()
        self.handled = 0
        self._tasks: set[asyncio.Task] = set()  # helper tasks this actor owns (awaits of replies)
        self.stopped = False  # set when the loop ends: later sends fail their reply at once

    async def setup(self) -> None:
        """Acquire resources; runs before ``ready`` is set."""

    async def teardown(self, error: BaseException | None) -> None:
        """Release resources; fail every request still waiting here."""

    async def handle(self, msg: Any) -> None:
        raise NotImplementedError

    async def send(self, msg: Any) -> None:
        """Queues ``msg``; once this actor has stopped, fails its reply instead (nobody would read it)."""
        if not self.stopped:
            await self.inbox.put(msg)
        if self.stopped:  # stopped before, or while this send waited for room
            self._fail_inbox(None)
            fail(getattr(msg, "reply", None), EngineClosedError(f"the engine closed before {self.name} handled "
                                                               f"{type(msg).__name__}"))

    def spawn(self, coro) -> asyncio.Task:
        """A child task owned by this actor, cancelled at teardown (never outlives the actor)."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def run(self) -> None:
        error: BaseException | None = None
        try:
            await self.setup()
            self.ready.set()
            while True:
                msg = await self.inbox.get()
                if isinstance(msg, Stop):
                    break
                await self.handle(msg)
                self.handled += 1
        except BaseException as e:  # including cancellation: teardown must still run
            error = e
            raise
        finally:
            self.stopped = True
            for task in list(self._tasks):
                task.cancel()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            self._fail_inbox(error)
            await self.teardown(error)

    def _fail_inbox(self, error: BaseException | None) -> None:
        while not self.inbox.empty():
            msg = self.inbox.get_nowait()
            fail(getattr(msg, "reply", None), EngineClosedError(f"the engine closed before {self.name} handled "
                                                               f"{type(msg).__name__} ({error or 'close'})"))

    def stats(self) -> dict[str, Any]:
        return {"handled": self.handled, "inbox": self.inbox.qsize()}


def fail(fut: asyncio.Future | None, exc: BaseException) -> None:
    if fut is not None and not fut.done():
        fut.set_exception(exc)
        fut.exception()  # marks it retrieved: a request that gave up must not log "never retrieved"


def resolve(fut: asyncio.Future | None, value: Any) -> None:
    if fut is not None and not fut.done():
        fut.set_result(value)
