"""``m2cache serve`` as clients meet it: a live server process on 127.0.0.1, the real ``openai`` client
(and raw HTTP where the client would hide what we check), a 20-layer tiny model through the tiers."""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

openai = pytest.importorskip("openai", reason="the serve tests need the openai client (the test extra)")

from m2cache.storage.reader import Store  # noqa: E402
from stress import scenarios as S  # noqa: E402

READY = re.compile(r"listening on http://127\.0\.0\.1:(\d+)")
PROMPTS = S.PROMPT_TEXTS


class Live:
    """One ``m2cache serve`` process; stderr is drained by a thread (kept for failure messages)."""

    def __init__(self, store: Path, *args: str) -> None:
        cmd = [sys.executable, "-m", "m2cache.cli.main", "serve", str(store), "--port", "0", *args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
        self.lines: list[str] = []
        self.port: int | None = None
        self.ready = threading.Event()
        threading.Thread(target=self._drain, daemon=True).start()
        if not self.ready.wait(90) or self.port is None:
            self.stop()
            raise AssertionError("the server did not start:\n" + "".join(self.lines))
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=60)

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            m = READY.search(line)
            if m:
                self.port = int(m.group(1))
                self.ready.set()
        self.ready.set()

    def metric(self, name: str) -> float:
        text = httpx.get(self.url + "/metrics").text
        m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
        return float(m.group(1)) if m else 0.0

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                raise
        return self.proc.returncode


@pytest.fixture(scope="module")
def deep(tmp_path_factory: pytest.TempPathFactory) -> S.Model:
    return S.build_tiny(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def server(deep: S.Model) -> Iterator[Live]:
    live = Live(deep.store, "--policy", "dense-fp16", "--compute-threads", "1")
    yield live
    assert live.stop() == 0, "".join(live.lines)


def wait_for(cond, timeout: float = 20.0) -> None:
    """Polls ``cond`` until it holds; a deadline (not a speed check) so a broken server fails, not hangs."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout:.0f} s")
        time.sleep(0.05)


def chat_text(live: Live, prompt: str, n: int, *, stream: bool) -> str:
    msgs = [{"role": "user", "content": prompt}]
    if not stream:
        r = live.client.chat.completions.create(model="m", messages=msgs, max_tokens=n, temperature=0)
        return r.choices[0].message.content or ""
    chunks = live.client.chat.completions.create(model="m", messages=msgs, max_tokens=n, temperature=0, stream=True)
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


# ---- the happy paths -----------------------------------------------------------------------------
def test_models_and_health_answer(server: Live) -> None:
    assert [m.id for m in server.client.models.list().data] == [server.client.models.list().data[0].id]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_a_chat_completion_streamed_equals_the_same_one_not_streamed(server: Live) -> None:
    whole = chat_text(server, PROMPTS[1], 12, stream=False)
    assert whole and chat_text(server, PROMPTS[1], 12, stream=True) == whole


def test_a_completion_gives_the_engine_s_own_greedy_text_and_counts_its_tokens(server: Live, deep: S.Model) -> None:
    r = server.client.completions.create(model="m", prompt=PROMPTS[0], max_tokens=8, temperature=0)
    assert r.usage.prompt_tokens == len(deep.prompts[0])
    assert r.choices[0].text == deep.dense.tokenizer.decode(deep.reference(0, 8)[:r.usage.completion_tokens])
    streamed = server.client.completions.create(model="m", prompt=PROMPTS[0], max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == r.choices[0].text


def test_a_stop_string_ends_the_text_before_it(server: Live) -> None:
    full = server.client.completions.create(model="m", prompt=PROMPTS[3], max_tokens=12, temperature=0)
    text = full.choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    assume = stop.strip() and text.find(stop) > 0
    if not assume:
        pytest.skip("the generated text has no usable stop string")
    r = server.client.completions.create(model="m", prompt=PROMPTS[3], max_tokens=12, temperature=0, stop=[stop])
    assert r.choices[0].text == text[:text.find(stop)] and r.choices[0].finish_reason == "stop"


def test_32_concurrent_streams_each_get_the_text_its_prompt_gets_alone(server: Live) -> None:
    alone = {p: chat_text(server, p, 10, stream=False) for p in PROMPTS}
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)

    async def one(prompt: str) -> str:
        chunks = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": prompt}],
                                                      max_tokens=10, temperature=0, stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])

    async def all_of_them() -> list[str]:
        async with asyncio.timeout(180):
            return await asyncio.gather(*(one(PROMPTS[i % len(PROMPTS)]) for i in range(32)))

    got = asyncio.run(all_of_them())
    assert got == [alone[PROMPTS[i % len(PROMPTS)]] for i in range(32)]


def test_metrics_are_prometheus_text_with_the_engine_s_figures(server: Live) -> None:
    text = httpx.get(server.url + "/metrics").text
    for name in ("m2cache_generated_tokens_total", "m2cache_time_to_first_token_seconds_bucket",
                 "m2cache_inter_token_latency_seconds_bucket", "m2cache_decode_tokens_per_second",
                 'm2cache_hit_ratio{tier="hbm"}', 'm2cache_bytes_per_token{edge="dram_to_hbm"}',
                 "m2cache_stall_fraction", "m2cache_queue_depth", "m2cache_event_loop_lag_seconds"):
        assert name in text, name


# ---- what bad input gets -------------------------------------------------------------------------
def test_a_body_that_is_not_json_gets_a_400_with_an_openai_error_body(server: Live) -> None:
    r = httpx.post(server.url + "/v1/completions", content=b'{"prompt": "x",', headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error" and "JSON" in r.json()["error"]["message"]


def test_a_field_of_the_wrong_type_gets_a_400_naming_it(server: Live) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        server.client.completions.create(model="m", prompt="x", max_tokens=4, temperature="hot")  # type: ignore[arg-type]
    assert e.value.status_code == 400 and e.value.body["param"] == "temperature"


def test_a_prompt_and_max_tokens_beyond_the_context_get_a_400_saying_the_limit(server: Live, deep: S.Model) -> None:
    context = Store(deep.store).config.max_position_embeddings
    with pytest.raises(openai.BadRequestError) as e:
        server.client.completions.create(model="m", prompt="x", max_tokens=context + 1)
    assert f"context of {context} tokens" in e.value.body["message"] and e.value.body["param"] == "max_tokens"


# ---- what bad luck gets --------------------------------------------------------------------------
def _open_stream(live: Live, max_tokens: int) -> tuple[httpx.Client, httpx.Response, Iterator[str]]:
    http = httpx.Client(timeout=60)
    req = http.build_request("POST", live.url + "/v1/completions",
                             json={"prompt": PROMPTS[0], "max_tokens": max_tokens, "stream": True})
    resp = http.send(req, stream=True)
    assert resp.status_code == 200
    return http, resp, resp.iter_lines()


def _next_event(lines: Iterator[str]) -> str:
    for line in lines:
        if line.startswith("data: "):
            return line[6:]
    raise AssertionError("the stream ended")


def test_a_client_that_disconnects_mid_stream_has_its_request_cancelled(server: Live) -> None:
    cancelled = server.metric('m2cache_engine_requests{how="cancelled"}')
    http, resp, lines = _open_stream(server, 400)
    _next_event(lines)
    resp.close()
    http.close()
    wait_for(lambda: server.metric('m2cache_engine_requests{how="cancelled"}') == cancelled + 1)
    wait_for(lambda: server.metric("m2cache_requests_in_flight") == 0)
    assert chat_text(server, PROMPTS[2], 4, stream=False)  # and the server still serves


def test_more_requests_than_admitted_get_429_with_retry_after(deep: S.Model) -> None:
    live = Live(deep.store, "--policy", "dense-fp16", "--max-requests", "1")
    try:
        http, resp, lines = _open_stream(live, 400)
        _next_event(lines)
        r = httpx.post(live.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error"
        resp.close()
        http.close()
        wait_for(lambda: live.metric("m2cache_requests_in_flight") == 0)
        assert httpx.post(live.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200
    finally:
        assert live.stop() == 0


def test_an_ssd_error_fails_its_request_with_a_500_naming_the_file_and_the_server_stays_up(deep: S.Model) -> None:
    spec = f"{S.SLOW_SSD},fail=1,fail_permanent=1,fail_path=*L{S.PERMANENT_LAYER:03d}.int4*"
    live = Live(deep.store, "--policy", "oracle:0.1,0.2,0.2", "--ssd-sim", spec, "--preload", "neuron")
    try:
        with pytest.raises(openai.InternalServerError) as e:
            live.client.completions.create(model="m", prompt=PROMPTS[0], max_tokens=4, temperature=0)
        assert f"L{S.PERMANENT_LAYER:03d}.int4" in e.value.body["message"]
        events = []
        http, resp, lines = _open_stream(live, 4)
        events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        http.close()
        assert "error" in events[-1] and "int4" in events[-1]["error"]["message"]
        ok = live.client.completions.create(model="m", prompt=PROMPTS[0], max_tokens=1, temperature=0)
        assert ok.usage.completion_tokens == 1  # the prefill reads no INT4: still served
        assert httpx.get(live.url + "/health").json()["status"] == "ok"
    finally:
        assert live.stop() == 0


def test_sigterm_ends_running_streams_with_an_error_event_and_the_server_exits(deep: S.Model) -> None:
    live = Live(deep.store, "--policy", "dense-fp16")
    http, resp, lines = _open_stream(live, 400)
    _next_event(lines)
    live.proc.send_signal(signal.SIGTERM)
    rest = [line[6:] for line in lines if line.startswith("data: ")]
    http.close()
    assert rest[-1] == "[DONE]"
    error = json.loads(rest[-2])["error"]
    assert error["type"] == "server_shutdown" and "predictor" not in error["message"]  # no engine internals
    time.sleep(0.2)
    late = httpx.post(live.url + "/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 2}, timeout=10)
    assert late.status_code == 503 and late.json()["error"]["type"] == "server_shutdown"
    assert httpx.get(live.url + "/health", timeout=10).json()["status"] == "draining"
    assert live.proc.wait(30) == 0


# ---- keys, usage, fields --------------------------------------------------------------------------
KEY = "sk-test-5f0b1e2d9c"


def test_with_an_api_key_every_v1_route_answers_401_without_it_and_the_key_is_never_logged(deep: S.Model) -> None:
    live = Live(deep.store, "--policy", "dense-fp16", "--api-key", KEY)
    try:
        for method, route, body in (("GET", "/v1/models", None), ("POST", "/v1/completions", {"prompt": "x"}),
                                    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
                r = httpx.request(method, live.url + route, json=body, headers=headers)
                assert r.status_code == 401, (route, headers)
                assert r.json()["error"]["code"] == "invalid_api_key" and KEY not in r.text
        authed = openai.OpenAI(base_url=live.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        assert authed.completions.create(model="m", prompt=PROMPTS[0], max_tokens=2, temperature=0).choices
        with pytest.raises(openai.AuthenticationError):
            live.client.models.list()  # the client's key is "none"
        assert httpx.get(live.url + "/health").status_code == 200  # public by default, as /metrics
        assert httpx.get(live.url + "/metrics").status_code == 200
    finally:
        assert live.stop() == 0
    assert KEY not in "".join(live.lines)


def test_the_key_may_come_from_the_environment_and_health_and_metrics_may_need_it_too(deep: S.Model) -> None:
    os.environ["M2CACHE_API_KEY"] = KEY
    try:
        live = Live(deep.store, "--policy", "dense-fp16", "--public", "none")
    finally:
        del os.environ["M2CACHE_API_KEY"]
    try:
        assert httpx.get(live.url + "/health").status_code == 401
        assert httpx.get(live.url + "/metrics").status_code == 401
        ok = httpx.get(live.url + "/health", headers={"Authorization": f"Bearer {KEY}"})
        assert ok.status_code == 200 and ok.json()["status"] == "ok"
    finally:
        assert live.stop() == 0


def test_usage_does_not_count_the_end_of_sequence_token(deep: S.Model, tmp_path: Path) -> None:
    import shutil

    import msgpack

    ref = deep.reference(0, 8)
    stop_at = next(i for i in range(2, 8) if ref[i] not in ref[:i])  # generated once, never before
    store = Path(shutil.copytree(deep.store, tmp_path / "store"))
    manifest = msgpack.unpackb((store / "manifest.msgpack").read_bytes(), raw=False, strict_map_key=False)
    manifest["config"]["eos_token_ids"] = [ref[stop_at]]  # the model "ends" where it generates that token
    (store / "manifest.msgpack").write_bytes(msgpack.packb(manifest, use_bin_type=True))
    live = Live(store, "--policy", "dense-fp16")
    try:
        r = live.client.completions.create(model="m", prompt=PROMPTS[0], max_tokens=8, temperature=0)
        assert r.choices[0].finish_reason == "stop"
        assert r.usage.completion_tokens == stop_at  # the tokens before it, not the end-of-sequence itself
        assert r.usage.total_tokens == r.usage.prompt_tokens + stop_at
    finally:
        assert live.stop() == 0


def test_max_completion_tokens_is_taken_as_newer_clients_send_it(server: Live) -> None:
    for route, body in (("/v1/completions", {"prompt": PROMPTS[0]}),
                        ("/v1/chat/completions", {"messages": [{"role": "user", "content": PROMPTS[0]}]})):
        r = httpx.post(server.url + route, json={**body, "max_completion_tokens": 3, "max_tokens": 9, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3


def test_n_above_one_gets_a_400_saying_one_choice_per_request(server: Live) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        server.client.completions.create(model="m", prompt="x", max_tokens=2, n=2)
    assert e.value.body["param"] == "n" and "one choice per request" in e.value.body["message"]


def test_a_request_that_cannot_get_room_in_the_kv_cache_in_time_gets_503_with_retry_after(deep: S.Model) -> None:
    # a slow disk read at every step: the first request holds most of the KV cache for many seconds
    # (nothing kept in DRAM for good: every step reads its neurons)
    live = Live(deep.store, "--policy", "dense-fp16", "--kv-tokens", "230", "--queue-timeout", "1",
                "--ssd-sim", "latency=10ms", "--preload", "neuron", "--no-compute-from-dram", "--dram-budget", "5%")
    try:
        http, resp, lines = _open_stream(live, 200)
        _next_event(lines)
        for stream in (False, True):
            r = httpx.post(live.url + "/v1/completions", json={"prompt": PROMPTS[1], "max_tokens": 40, "stream": stream},
                           timeout=60)
            assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
            assert r.json()["error"]["type"] == "overloaded_error"
        resp.close()
        http.close()
        wait_for(lambda: live.metric("m2cache_requests_in_flight") == 0)
        ok = httpx.post(live.url + "/v1/completions", json={"prompt": PROMPTS[1], "max_tokens": 4}, timeout=120)
        assert ok.status_code == 200  # room again once the first request went
    finally:
        assert live.stop() == 0
