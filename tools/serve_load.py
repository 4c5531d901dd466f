"""Load for ``m2cache serve``: streaming clients (the real ``openai`` client) on loopback, bounded in
count and time.

    python tools/serve_load.py STORE --clients 1,2,4,8,16 --requests 4 --max-tokens 32 [--policy dense-fp16]
    python tools/serve_load.py STORE --soak 600 --clients 16 --disconnect 0.1

Starts the server itself (``--port 0``) with the engine options after ``--`` (``-- --hbm-budget 20%``),
or uses ``--url http://127.0.0.1:PORT`` (loopback only). Per concurrency: aggregate decode tokens/s
(completion tokens over the phase's wall time), and per request p50/p99 time to first token and
inter-token latency. ``--soak S``: S seconds of ``--clients`` streams with random prompt lengths and
random disconnects (``--disconnect`` probability per request); then the errors (other than the
disconnects it made), the server's RSS and asyncio task count before, every 30 s (a warm-up rise then a
plateau is not a leak; a steady climb is) and after, and the worst loop lag.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse

import httpx
import openai

WORDS = ("the sky is blue because light scatters off the air and the sun sets red in the evening while "
         "people write code and read books about caches memory disks models and tokens").split()


@dataclass
class Result:
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    tokens: int = 0
    error: str | None = None
    disconnected: bool = False


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def one(client: openai.AsyncOpenAI, prompt: str, max_tokens: int, disconnect_after: int | None) -> Result:
    r, t0 = Result(), time.perf_counter()
    last = t0
    try:
        stream = await client.completions.create(model="m", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                                 stream=True, stream_options={"include_usage": True})
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.choices and chunk.choices[0].finish_reason is None:  # one chunk per token
                if r.ttft is None:
                    r.ttft = now - t0
                else:
                    r.gaps.append(now - last)
                last = now
            if chunk.usage is not None:
                r.tokens = chunk.usage.completion_tokens
            if disconnect_after is not None and len(r.gaps) >= disconnect_after:
                r.disconnected = True
                await stream.close()
                break
    except openai.APIError as e:
        r.error = f"{type(e).__name__}: {getattr(e, 'body', None) or e}"
    return r


async def phase(url: str, clients: int, requests: int, max_tokens: int, rng: random.Random) -> dict:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    prompts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 24))) for _ in range(clients * requests)]

    async def worker(k: int) -> list[Result]:
        return [await one(client, prompts[k * requests + i], max_tokens, None) for i in range(requests)]

    t0 = time.perf_counter()
    results = [r for rs in await asyncio.gather(*(worker(k) for k in range(clients))) for r in rs]
    wall = time.perf_counter() - t0
    await client.close()
    tokens = sum(r.tokens for r in results)
    ttft = [r.ttft for r in results if r.ttft is not None]
    gaps = [g for r in results for g in r.gaps]
    return {"clients": clients, "requests": len(results), "errors": [r.error for r in results if r.error],
            "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "ttft_p50_s": pct(ttft, 0.5), "ttft_p99_s": pct(ttft, 0.99),
            "itl_p50_s": pct(gaps, 0.5), "itl_p99_s": pct(gaps, 0.99)}


def metric(url: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", httpx.get(url + "/metrics").text, re.M)
    return float(m.group(1)) if m else float("nan")


def rss_mb(pid: int | None) -> float:
    if pid is None:
        return float("nan")
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def soak(url: str, seconds: float, clients: int, max_tokens: int, p_disconnect: float, rng: random.Random,
               pid: int | None) -> dict:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    before = {"rss_mb": rss_mb(pid), "tasks": metric(url, "m2cache_asyncio_tasks")}
    end = time.monotonic() + seconds
    results: list[Result] = []
    worst_lag = 0.0

    async def worker() -> None:
        while time.monotonic() < end:
            prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 200)))
            cut = rng.randint(0, max_tokens // 2) if rng.random() < p_disconnect else None
            results.append(await one(client, prompt, rng.randint(1, max_tokens), cut))

    samples: list[tuple[float, float, float]] = []  # (seconds into the soak, RSS MB, asyncio tasks)
    t_start = time.monotonic()

    async def lag() -> None:
        nonlocal worst_lag
        next_sample = t_start
        while time.monotonic() < end:
            worst_lag = max(worst_lag, await asyncio.to_thread(metric, url, "m2cache_event_loop_lag_seconds"))
            if time.monotonic() >= next_sample:
                tasks = await asyncio.to_thread(metric, url, "m2cache_asyncio_tasks")
                samples.append((round(time.monotonic() - t_start), round(rss_mb(pid), 1), tasks))
                next_sample += 30
            await asyncio.sleep(2)

    await asyncio.gather(lag(), *(worker() for _ in range(clients)))
    await client.close()
    await asyncio.sleep(2)  # let cancelled requests reach a step boundary
    after = {"rss_mb": rss_mb(pid), "tasks": metric(url, "m2cache_asyncio_tasks"),
             "in_flight": metric(url, "m2cache_requests_in_flight")}
    return {"seconds": seconds, "clients": clients, "requests": len(results),
            "disconnects": sum(r.disconnected for r in results), "errors": [r.error for r in results if r.error],
            "tokens": sum(r.tokens for r in results), "before": before, "after": after,
            "worst_loop_lag_s": worst_lag, "rss_and_tasks_every_30s": samples}


def start_server(store: str, engine_args: list[str]) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "m2cache.cli.main", "serve", store, "--port", "0", *engine_args]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    found: list[str] = []

    def drain() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            m = re.search(r"listening on (http://\S+)", line)
            if m:
                found.append(m.group(1))
            elif not found:
                sys.stderr.write(line)

    threading.Thread(target=drain, daemon=True).start()
    t = time.monotonic()
    while not found:
        if proc.poll() is not None or time.monotonic() - t > 300:
            raise SystemExit("the server did not start")
        time.sleep(0.1)
    return proc, found[0]


def main() -> int:
    argv = sys.argv[1:]
    engine_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store", nargs="?")
    ap.add_argument("--url", help="an already running server (loopback only)")
    ap.add_argument("--clients", default="1,2,4,8,16")
    ap.add_argument("--requests", type=int, default=3, help="requests per client per phase")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--soak", type=float, help="seconds of soak instead of the phases")
    ap.add_argument("--disconnect", type=float, default=0.1, help="soak: share of requests that disconnect")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    proc, url = None, args.url
    if url is None:
        if not args.store:
            ap.error("give STORE (the tool starts the server) or --url")
        proc, url = start_server(args.store, engine_args)
    if urlparse(url).hostname not in ("127.0.0.1", "localhost", "::1"):
        ap.error("loopback only: the load is for a server on this machine")
    rng = random.Random(args.seed)
    out: dict = {"url": url, "engine_args": engine_args}
    try:
        if args.soak:
            out["soak"] = asyncio.run(soak(url, args.soak, int(args.clients.split(",")[-1]), args.max_tokens,
                                           args.disconnect, rng, proc.pid if proc else None))
            print(json.dumps(out["soak"], indent=1))
        else:
            out["phases"] = []
            print(f"{'clients':>7} {'requests':>8} {'tok/s':>8} {'x 1':>6} {'TTFT p50':>9} {'p99':>7} "
                  f"{'ITL p50':>8} {'p99':>7} errors")
            for c in (int(x) for x in args.clients.split(",")):
                ph = asyncio.run(phase(url, c, args.requests, args.max_tokens, rng))
                out["phases"].append(ph)
                base = out["phases"][0]["tokens_per_s"]
                print(f"{c:>7} {ph['requests']:>8} {ph['tokens_per_s']:>8.2f} {ph['tokens_per_s'] / base:>6.2f} "
                      f"{ph['ttft_p50_s']:>9.3f} {ph['ttft_p99_s']:>7.3f} {ph['itl_p50_s']:>8.3f} "
                      f"{ph['itl_p99_s']:>7.3f} {len(ph['errors'])}", flush=True)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
