"""Long fault and load scenarios (``make stress``, bounded to 10 minutes by the Makefile): every
scenario of ``scenarios.py`` at full size, several seeds where timing matters, on the 20-layer tiny
model. Each must leave nothing wrong, hung, leaked or over budget, and never hold the event loop for
more than 50 ms (a watchdog task samples it every 5 ms)."""
from __future__ import annotations

import asyncio

import pytest

from stress import scenarios as S

pytestmark = pytest.mark.stress
MAX_LAG_MS = 50.0


async def run(scenario, record_property, **kw) -> S.Outcome:
    async with asyncio.timeout(90):
        out = await scenario(**kw)
    record_property("worst_event_loop_lag_ms", round(out.worst_lag_ms, 1))
    assert out.clean, (out.notes, out.errors)
    assert out.worst_lag_ms <= MAX_LAG_MS, f"the event loop was held for {out.worst_lag_ms:.1f} ms"
    return out


async def test_fault_free_baseline(deep, record_property) -> None:
    out = await run(S.fault_free, record_property, model=deep, n=8, max_tokens=16)
    assert out.equal == out.requests == 8


@pytest.mark.parametrize("seed", [1, 2])
async def test_transient_errors_change_no_token(deep, record_property, seed: int) -> None:
    out = await run(S.transient, record_property, model=deep, n=8, max_tokens=16, seed=seed)
    assert out.equal == out.requests == 8


async def test_a_permanent_error_fails_typed_and_the_engine_closes_clean(deep, record_property) -> None:
    out = await run(S.permanent, record_property, model=deep, n=8, max_tokens=16)
    assert out.failed_typed == out.requests == 8


async def test_a_permanent_error_spares_requests_that_do_not_need_that_file(deep, record_property) -> None:
    out = await run(S.permanent_isolated, record_property, model=deep, n=12, max_tokens=12)
    assert out.failed_typed == 6 and out.equal == 7


@pytest.mark.parametrize("seed", [2, 3, 4])
async def test_corruption_is_caught_and_never_gives_wrong_text(deep, record_property, seed: int) -> None:
    out = await run(S.corrupt, record_property, model=deep, n=8, max_tokens=16, seed=seed)
    assert out.equal + out.failed_typed == out.requests == 8


async def test_stalls_change_no_token(deep, record_property) -> None:
    out = await run(S.stall, record_property, model=deep, n=6, max_tokens=12)
    assert out.equal == out.requests == 6


@pytest.mark.parametrize("seed", range(4))
async def test_cancellation_storm(deep, record_property, seed: int) -> None:
    out = await run(S.cancel_storm, record_property, model=deep, n=16, max_tokens=12, seed=seed)
    assert out.cancelled + out.equal == out.requests == 17


async def test_32_concurrent_requests_of_random_lengths(deep, record_property) -> None:
    out = await run(S.concurrent, record_property, model=deep, n=32, max_tokens=16)
    assert out.equal == out.requests == 32


@pytest.mark.parametrize("seed", range(5))
async def test_close_while_reads_are_in_flight(deep, record_property, seed: int) -> None:
    out = await run(S.shutdown_inflight, record_property, model=deep, n=8, max_tokens=12, seed=seed)
    assert out.equal + out.failed_typed == out.requests == 8
