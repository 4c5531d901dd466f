"""Load for ``m2cache serve``: streaming clients (the real ``openai`` client) on loopback, bounded in
count and time.

    python tools/serve_load.py STORE --clients 1,2,4,8,16 --requests 4 --max-tokens 32 [--policy dense-fp16]
    python tools/serve_load.py STORE --soak 600 --clients 16 --disconnect 0.1
    python tools/serve_load.py STORE --soak 600 --clients 24 --words 1,300 --sample 5 -- --memory 1.2GB

Starts the server itself (``--port 0``) with the engine options after ``--`` (``-- --hbm-budget 20%``),
or uses ``--url http://127.0.0.1:PORT`` (loopback only). Per concurrency: aggregate decode tokens/s
(completion tokens over the phase's wall time), and per request p50/p99 time to first token and
inter-token latency. ``--soak S``: S seconds of ``--clients`` streams with random prompt lengths and
random disconnects (``--disconnect`` probability per request); then the errors (other than the
disconnects it made; a 429 or 503 with Retry-After is counted apart, as a refusal), the server's RSS and
asyncio task count before, every ``--sample`` seconds (a warm-up rise then a plateau is not a leak; a
steady climb is) and after, and the worst loop lag. Under ``--memory`` the server runs in a memory cgroup
(as ``m2cache bench`` runs its systems): the samples add the cgroup's usage, its peak and its limit (RSS
and page cache together, what the kernel holds the limit against), and its OOM kills.
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
from pathlib import Path
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
    refused: str | None = None  # a 429 or 503 with Retry-After: the server said "not now"


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
    except openai.APIStatusError as e:
        if e.status_code in (429, 503) and e.response.headers.get("retry-after"):
            r.refused = f"{e.status_code} {(e.body or {}).get('type', '')}".strip()
        else:
            r.error = f"{type(e).__name__}: {getattr(e, 'body', None) or e}"
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
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except FileNotFoundError:
        pass
    return float("nan")


def server_pid(pid: int | None) -> int | None:
    """The process that serves: under ``--memory`` the command runs the server again inside the limit, as its
    child."""
    if pid is None:
        return None
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except FileNotFoundError:
        return pid
    return int(children[0]) if children else pid


def cgroup_mb(pid: int | None) -> dict:
    """The memory cgroup of ``pid`` (v1 or v2) when it has a limit: usage, peak and limit in MB, OOM kills."""
    if pid is None:
        return {}
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except FileNotFoundError:
        return {}
    for line in lines:
        _, ctrls, path = line.split(":", 2)
        if "memory" in ctrls.split(","):
            d, files = Path("/sys/fs/cgroup/memory") / path.lstrip("/"), ("memory.usage_in_bytes",
                       "memory.max_usage_in_bytes", "memory.limit_in_bytes", "memory.oom_control")
        elif ctrls == "":
            d, files = Path("/sys/fs/cgroup/unified") / path.lstrip("/"), ("memory.current", "memory.peak",
                                                                          "memory.max", "memory.events")
        else:
            continue
        try:
            raw = [(d / f).read_text() for f in files]
        except (FileNotFoundError, PermissionError):
            continue
        if raw[2].strip() == "max" or int(raw[2]) >= 1 << 60:
            continue
        kv = dict(x.split() for x in raw[3].splitlines() if len(x.split()) == 2)
        return {"cgroup_mb": int(raw[0]) / 2**20, "cgroup_peak_mb": int(raw[1]) / 2**20,
                "limit_mb": int(raw[2]) / 2**20, "oom_kills": int(kv.get("oom_kill", 0))}
    return {}


async def soak(url: str, seconds: float, clients: int, max_tokens: int, p_disconnect: float, rng: random.Random,
               pid: int | None, words: tuple[int, int] = (1, 200), every: float = 30.0) -> dict:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    pid = server_pid(pid)
    before = {"rss_mb": rss_mb(pid), "tasks": metric(url, "m2cache_asyncio_tasks"), **cgroup_mb(pid)}
    end = time.monotonic() + seconds
    results: list[Result] = []
    worst_lag = 0.0

    async def worker() -> None:
        while time.monotonic() < end:
            prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(*words)))
            cut = rng.randint(0, max_tokens // 2) if rng.random() < p_disconnect else None
            r = await one(client, prompt, rng.randint(1, max_tokens), cut)
            results.append(r)
            if r.refused:
                await asyncio.sleep(1.0)  # as told by Retry-After

    samples: list[dict] = []  # seconds into the soak, RSS MB, asyncio tasks, in flight (and the cgroup's figures)
    t_start = time.monotonic()

    async def lag() -> None:
        nonlocal worst_lag
        next_sample = t_start
        while time.monotonic() < end:
            worst_lag = max(worst_lag, await asyncio.to_thread(metric, url, "m2cache_event_loop_lag_seconds"))
            if time.monotonic() >= next_sample:
                tasks = await asyncio.to_thread(metric, url, "m2cache_asyncio_tasks")
                flight = await asyncio.to_thread(metric, url, "m2cache_requests_in_flight")
                samples.append({"t_s": round(time.monotonic() - t_start), "rss_mb": round(rss_mb(pid), 1),
                                "tasks": tasks, "in_flight": flight,
                                **{k: round(v, 1) for k, v in cgroup_mb(pid).items()}})
                next_sample += every
            await asyncio.sleep(min(2.0, every))

    await asyncio.gather(lag(), *(worker() for _ in range(clients)))
    await client.close()
    await asyncio.sleep(2)  # let cancelled requests reach a step boundary
    after = {"rss_mb": rss_mb(pid), "tasks": metric(url, "m2cache_asyncio_tasks"),
             "in_flight": metric(url, "m2cache_requests_in_flight"), **cgroup_mb(pid)}
    refused: dict[str, int] = {}
    for r in results:
        if r.refused:
            refused[r.refused] = refused.get(r.refused, 0) + 1
    return {"seconds": seconds, "clients": clients, "requests": len(results),
            "completed": sum(1 for r in results if not (r.error or r.refused or r.disconnected)),
            "disconnects": sum(r.disconnected for r in results), "refused": refused,
            "errors": [r.error for r in results if r.error],
            "tokens": sum(r.tokens for r in results), "before": before, "after": after,
            "worst_loop_lag_s": worst_lag, "samples": samples}


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
    ap.add_argument("--words", default="1,200", help="soak: prompt length range in words, A,B")
    ap.add_argument("--sample", type=float, default=30.0, help="soak: seconds between samples of RSS and tasks")
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
            lo, hi = (int(x) for x in args.words.split(","))
            out["soak"] = asyncio.run(soak(url, args.soak, int(args.clients.split(",")[-1]), args.max_tokens,
                                           args.disconnect, rng, proc.pid if proc else None, (lo, hi), args.sample))
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
