"""Faults under load: ``m2cache serve`` over a faulty simulated SSD while clients stream, optionally on a
busy machine and over a store with a block damaged for good; every text checked against the fault-free one.

    python tools/fault_soak.py STORE --seconds 300 --clients 16 --busy 1 \\
        --ssd-sim "fail=0.05,corrupt=0.02,stall=50ms@0.02,seed=5" [--damage 10:int8:700] -- --policy gate:0.1,0.2,0.7

First a fault-free server (the real disk, the engine arguments after ``--``) gives each prompt's greedy text
alone, one request at a time. Then ``--busy`` processes spin on the CPU beside a second server, over the
``--ssd-sim`` faults and, with ``--damage LAYER:PRECISION:NEURON``, over a private copy of the store with
one byte of that neuron's block flipped on disk (corruption for good); ``--clients`` streams run greedy
requests over the prompts for ``--seconds``. The table: requests, texts equal to the fault-free ones,
texts that changed (must be none), errors by cause (with the files they name), and what was left after
(requests in flight, asyncio tasks, RSS before and after), with the server's count of reads that came right
again after a transient fault.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import metric, rss_mb, server_pid  # noqa: E402

TOPICS = ("the sky is blue", "bicycles were invented", "caches make disks fast", "the moon has phases",
          "rivers reach the sea", "bread rises", "trains run on time", "the tide comes in", "leaves turn red",
          "ice floats", "birds migrate", "clocks keep time", "bees make honey", "stars twinkle", "salt melts ice",
          "the wind blows")


class Server:
    """One ``m2cache serve`` process, its stderr kept in full (for the warnings it logs)."""

    def __init__(self, store: str, args: list[str]) -> None:
        cmd = [sys.executable, "-m", "m2cache.cli.main", "serve", store, "--port", "0", *args]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.url: str | None = None
        threading.Thread(target=self._drain, daemon=True).start()
        t = time.monotonic()
        while self.url is None:
            if self.proc.poll() is not None or time.monotonic() - t > 300:
                raise SystemExit("the server did not start:\n" + "".join(self.lines[-20:]))
            time.sleep(0.1)

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            m = re.search(r"listening on (http://\S+)", line)
            if m:
                self.url = m.group(1)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(120)


async def ask(client: openai.AsyncOpenAI, prompt: str, max_tokens: int) -> tuple[str | None, str | None]:
    """(text, None) or (None, the error: its type and message)."""
    try:
        chunks = await client.completions.create(model="m", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                                 stream=True)
        text = "".join([c.choices[0].text async for c in chunks if c.choices])
        return text, None
    except openai.APIStatusError as e:
        body = e.body if isinstance(e.body, dict) else {}
        return None, f"{e.status_code} {body.get('message', str(e))}"
    except openai.APIError as e:  # an error event mid-stream
        return None, f"stream {getattr(e, 'body', None) or e}"


def reference(store: str, engine_args: list[str], prompts: list[str], max_tokens: int) -> list[str]:
    srv = Server(store, engine_args)
    try:
        client = openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=600)

        async def all_alone() -> list[str]:
            out = []
            for p in prompts:
                text, err = await ask(client, p, max_tokens)
                if err is not None:
                    raise SystemExit(f"the fault-free reference failed: {err}")
                out.append(text or "")
            await client.close()
            return out

        return asyncio.run(all_alone())
    finally:
        srv.stop()


def damage(store: str, spec: str, into: Path) -> tuple[str, str]:
    """A copy of ``store`` with one byte of ``LAYER:PRECISION:NEURON``'s block flipped; (copy, damaged file)."""
    from m2cache.storage.layout import ffn_file_name
    from m2cache.storage.reader import Store

    layer, precision, neuron = spec.split(":")
    copy = into / "store"
    shutil.copytree(store, copy)
    geom = Store(copy).geometry[precision]
    path = copy / ffn_file_name(int(layer), precision)
    block = int(neuron) // geom.neurons_per_block
    with open(path, "r+b") as f:
        f.seek(block * geom.block_bytes + 100)
        b = f.read(1)
        f.seek(block * geom.block_bytes + 100)
        f.write(bytes([b[0] ^ 0x5A]))
    return str(copy), str(path)


async def soak(url: str, prompts: list[str], refs: list[str], clients: int, seconds: float, max_tokens: int,
               seed: int) -> dict:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=900)
    rng = random.Random(seed)
    end = time.monotonic() + seconds
    tally: collections.Counter[str] = collections.Counter()
    causes: collections.Counter[str] = collections.Counter()
    by_prompt: dict[int, collections.Counter[str]] = {i: collections.Counter() for i in range(len(prompts))}

    async def worker() -> None:
        while time.monotonic() < end:
            i = rng.randrange(len(prompts))
            text, err = await ask(client, prompts[i], max_tokens)
            tally["requests"] += 1
            outcome = "errors" if err is not None else "same_text" if text == refs[i] else "changed_text"
            tally[outcome] += 1
            by_prompt[i][outcome] += 1
            if err is not None:
                causes[re.sub(r"\d+-\d+", "N-M", err)[:240]] += 1

    await asyncio.gather(*(worker() for _ in range(clients)))
    await client.close()
    return {"tally": dict(tally), "errors_by_cause": dict(causes),
            "by_prompt": {i: dict(c) for i, c in by_prompt.items()}}


def main() -> int:
    argv = sys.argv[1:]
    engine_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store")
    ap.add_argument("--seconds", type=float, default=300)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--busy", type=int, default=1, help="processes spinning on the CPU beside the server")
    ap.add_argument("--ssd-sim", default="fail=0.05,corrupt=0.02,stall=50ms@0.02,seed=5")
    ap.add_argument("--damage", help="LAYER:PRECISION:NEURON: flip a byte of that neuron's block in a copy of the store")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    prompts = [f"Question {i}: explain why {t}." for i, t in enumerate(TOPICS)]
    t0 = time.perf_counter()
    refs = reference(args.store, engine_args, prompts, args.max_tokens)
    print(f"fault-free reference: {len(refs)} prompts alone in {time.perf_counter() - t0:.0f} s", flush=True)
    with tempfile.TemporaryDirectory(prefix="m2cache-fault-soak-") as tmp:
        store, damaged = (args.store, None) if not args.damage else damage(args.store, args.damage, Path(tmp))
        spin = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
        try:
            srv = Server(store, [*engine_args, "--ssd-sim", args.ssd_sim])
            assert srv.url is not None
            pid = server_pid(srv.proc.pid)
            before = {"rss_mb": rss_mb(pid), "tasks": metric(srv.url, "m2cache_asyncio_tasks")}
            out = asyncio.run(soak(srv.url, prompts, refs, args.clients, args.seconds, args.max_tokens, args.seed))
            time.sleep(2)  # cancelled work reaches a step boundary
            after = {"rss_mb": rss_mb(pid), "tasks": metric(srv.url, "m2cache_asyncio_tasks"),
                     "in_flight": metric(srv.url, "m2cache_requests_in_flight")}
            rc = srv.stop()
        finally:
            for p in spin:
                p.kill()
                p.wait()
    logs = "".join(srv.lines)
    out |= {"store": args.store, "damaged_file": damaged, "ssd_sim": args.ssd_sim, "busy": args.busy,
            "clients": args.clients, "seconds": args.seconds, "engine_args": engine_args, "before": before,
            "after": after, "server_exit": rc,
            "transient_corruptions_recovered": len(re.findall(r"read correctly on read", logs)),
            "unstable_reads": len(re.findall(r"UnstableReadError", logs)),
            "layers_read_by_block": len(re.findall(r"is not read whole any more", logs))}
    t = out["tally"]
    print(f"requests {t.get('requests', 0)}: same text {t.get('same_text', 0)}, changed text {t.get('changed_text', 0)}, "
          f"errors {t.get('errors', 0)}")
    for cause, n in out["errors_by_cause"].items():
        print(f"  {n:>5} x {cause}")
    print("by prompt (requests: same text / changed / errors): " + ", ".join(
        f"{i}: {c.get('same_text', 0)}/{c.get('changed_text', 0)}/{c.get('errors', 0)}" for i, c in out["by_prompt"].items()))
    print(f"after: in flight {after['in_flight']:.0f}, asyncio tasks {before['tasks']:.0f} -> {after['tasks']:.0f}, "
          f"RSS {before['rss_mb']:.0f} -> {after['rss_mb']:.0f} MB; server exit {rc}; reads that came right again "
          f"after a corrupt read: {out['transient_corruptions_recovered']}; layers read by block: "
          f"{out['layers_read_by_block']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
