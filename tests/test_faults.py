"""The fast fault subset (``make test``): each stress scenario once, small, on a 20-layer tiny model
over a simulated SSD — transient errors, a permanent error (and one the engine can isolate), flipped
bytes, stalls, a cancellation storm, many concurrent requests, close() with reads in flight.

Every scenario must leave nothing wrong, hung, leaked or over budget; the event-loop lag is recorded
(``record_property``), never asserted here (``make stress`` asserts it). The larger versions are in
``tests/stress``.
"""
from __future__ import annotations

import asyncio

import pytest

from stress import scenarios as S


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    with S.one_torch_thread():
        yield


@pytest.fixture(scope="module")
def deep(tmp_path_factory: pytest.TempPathFactory) -> S.Model:
    return S.build_tiny(tmp_path_factory.mktemp("faults"))


async def run(scenario, record_property, **kw) -> S.Outcome:
    async with asyncio.timeout(120):
        out = await scenario(**kw)
    record_property("worst_event_loop_lag_ms", round(out.worst_lag_ms, 1))
    assert out.clean, (out.notes, out.errors)
    return out


async def test_transient_errors_are_retried_and_change_no_token(deep, record_property) -> None:
    out = await run(S.transient, record_property, model=deep, n=3, max_tokens=6)
    assert out.equal == out.requests == 3


async def test_a_permanent_error_fails_every_request_that_needs_it_with_a_typed_error(deep, record_property) -> None:
    out = await run(S.permanent, record_property, model=deep, n=3, max_tokens=6)
    assert out.failed_typed == out.requests == 3
    assert all("L001.fp16" in e and "layer 1" in e and "neurons" in e for e in out.errors)


@pytest.mark.parametrize("lookahead", [False, True], ids=["in-turn", "lookahead"])
async def test_a_permanent_error_spares_requests_that_do_not_need_that_file(deep, record_property, lookahead) -> None:
    out = await run(S.permanent_isolated, record_property, model=deep, n=4, max_tokens=4, lookahead=lookahead)
    assert out.failed_typed == 2  # the decode requests (they read INT4)
    assert out.equal == 3  # the prompt-only requests, and one more after the failures
    assert all("L001.int4" in e for e in out.errors)


async def test_flipped_bytes_are_caught_by_checksums_and_never_change_a_token(deep, record_property) -> None:
    out = await run(S.corrupt, record_property, model=deep, n=3, max_tokens=6)
    assert out.equal + out.failed_typed == out.requests  # never wrong text without an error
    assert out.equal == out.requests  # at 1% one corrupt read, re-read once, succeeds


async def test_stalls_delay_but_change_no_token(deep, record_property) -> None:
    out = await run(S.stall, record_property, model=deep, n=2, max_tokens=4)
    assert out.equal == out.requests == 2


async def test_a_cancellation_storm_leaves_the_engine_serving_the_right_tokens(deep, record_property) -> None:
    out = await run(S.cancel_storm, record_property, model=deep, n=6, max_tokens=6)
    assert out.cancelled + out.equal == out.requests == 7
    assert out.equal >= 1  # the request after the storm


async def test_many_concurrent_requests_of_random_lengths_each_get_their_own_tokens(deep, record_property) -> None:
    out = await run(S.concurrent, record_property, model=deep, n=12, max_tokens=6)
    assert out.equal == out.requests == 12


async def test_close_with_reads_in_flight_ends_every_request(deep, record_property) -> None:
    out = await run(S.shutdown_inflight, record_property, model=deep, n=4, max_tokens=8)
    assert out.equal + out.failed_typed == out.requests == 4
    assert all(e.startswith("EngineClosedError") for e in out.errors)
