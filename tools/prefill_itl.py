"""What a long prompt does to the streams already running: their inter-token latency while it arrives,
with and without chunked prefill, through ``m2cache serve`` on loopback.

    python tools/prefill_itl.py STORE --streams 4 --prompt-tokens 2000 --chunks 0,256 --rounds 2 [-- ENGINE ARGS]

Per setting of ``--prefill-chunk`` (0: a prompt in one step; the settings alternate, ``--rounds`` times,
each on a fresh server): ``--streams`` requests stream greedily; once each has its first tokens, one
request with a prompt of about ``--prompt-tokens`` tokens arrives. The running streams' gaps between
tokens from its arrival until its first token are its cost to them (p50, p99, max); the long request's
time to first token is what chunking costs it.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import pct, start_server  # noqa: E402

WORDS = ("the history of the bicycle begins with wooden machines pushed along by the feet and later gets "
         "pedals chains gears and air filled tyres that made long rides possible").split()


async def stream(http: httpx.AsyncClient, url: str, prompt: str, max_tokens: int, stamps: list[list[float]],
                 started: asyncio.Event) -> None:
    """One client streaming greedily, request after request (a stream that ends is followed by the next at
    once); ``stamps`` gets one list of token arrival times per request."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    while True:
        times: list[float] = []
        stamps.append(times)
        async with http.stream("POST", url + "/v1/completions", json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    times.append(time.perf_counter())
                    if len(times) >= 3:
                        started.set()


async def one_round(url: str, streams: int, prompt_tokens: int, max_tokens: int) -> dict:
    async with httpx.AsyncClient(timeout=900) as http:
        stamps: list[list[float]] = []  # token arrival times, one list per request
        events = [asyncio.Event() for _ in range(streams)]
        counting = ", ".join(str(n) for n in range(1, 12))  # a prompt the model continues at length
        tasks = [asyncio.create_task(stream(http, url, f"{counting} (list {i}),", max_tokens, stamps, events[i]))
                 for i in range(streams)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 600)
        long_prompt = " ".join(WORDS[i % len(WORDS)] for i in range(prompt_tokens))
        t_arrive = time.perf_counter()
        r = await http.post(url + "/v1/completions", json={"prompt": long_prompt, "max_tokens": 1, "temperature": 0})
        t_first = time.perf_counter()
        r.raise_for_status()
        prompt_len = r.json()["usage"]["prompt_tokens"]
        # the gap that spans the long prompt's prefill ends with each stream's next token: wait for it
        deadline = time.perf_counter() + 300
        while time.perf_counter() < deadline and sum(1 for s in stamps if s and s[-1] > t_first) < streams:
            await asyncio.sleep(0.05)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    gaps = [b - a for s in stamps for a, b in zip(s, s[1:]) if b > t_arrive and a < t_first]
    before = [b - a for s in stamps for a, b in zip(s, s[1:]) if b <= t_arrive]
    return {"prompt_tokens": prompt_len, "long_ttft_s": t_first - t_arrive, "gaps_during": gaps,
            "gaps_before": before}


def main() -> int:
    argv = sys.argv[1:]
    engine_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store")
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=2000, help="about this many prompt tokens (words)")
    ap.add_argument("--max-tokens", type=int, default=4000, help="the running streams' limit (they are cut short)")
    ap.add_argument("--chunks", default="0,256", help="--prefill-chunk settings to compare (0: no chunking)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    out: dict[str, list[dict]] = {}
    print(f"{'chunk':>6} {'round':>5} {'prompt':>6} {'long TTFT s':>11} {'ITL before p50':>14} {'during p50':>10} "
          f"{'p99':>7} {'max':>7} {'gaps':>5}", flush=True)
    for rnd in range(args.rounds):
        for chunk in args.chunks.split(","):
            proc, url = start_server(args.store, [*engine_args, "--prefill-chunk", chunk])
            try:
                r = asyncio.run(one_round(url, args.streams, args.prompt_tokens, args.max_tokens))
            finally:
                proc.terminate()
                proc.wait(60)
            out.setdefault(chunk, []).append(r)
            g, b = r["gaps_during"], r["gaps_before"]
            print(f"{chunk:>6} {rnd:>5} {r['prompt_tokens']:>6} {r['long_ttft_s']:>11.2f} "
                  f"{statistics.median(b) if b else float('nan'):>14.3f} {pct(g, 0.5):>10.3f} {pct(g, 0.99):>7.3f} "
                  f"{max(g, default=float('nan')):>7.3f} {len(g):>5}", flush=True)
    print("all rounds:")
    for chunk, rs in out.items():
        g = [x for r in rs for x in r["gaps_during"]]
        print(f"  chunk {chunk:>4}: running streams' ITL while the long prompt arrives p50 {pct(g, 0.5):.3f} s, "
              f"p99 {pct(g, 0.99):.3f} s, max {max(g, default=float('nan')):.3f} s ({len(g)} gaps); long TTFT "
              f"{statistics.median(r['long_ttft_s'] for r in rs):.2f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"engine_args": engine_args, "results": out}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
