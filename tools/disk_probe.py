"""How fast this machine's disk serves a store's reads: random reads by size and queue depth, and one
policy's neuron-level reads of a layer as the engine issues them.

    python tools/disk_probe.py STORE [--shares 0.1,0.2] [--layers 8]

Reads go through O_DIRECT (the page cache plays no part); run it with nothing else using the disk. The
first table says whether the disk is bound by reads a second or by bytes; the second times the FP16 and
INT8 neurons of a gate-like selection (random ids at the given shares, the precisions read at once, each
one's runs on 8 threads) for a few merge gaps (``MERGE_GAP_BYTES``), with the bytes each reads.
"""
from __future__ import annotations

import argparse
import mmap
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

import m2cache.storage.bundle_files as bundle_files
from m2cache.storage.reader import Store
from m2cache.storage.ssd import FileBackend


def random_reads(paths: list[str], size: int, threads: int, total: int) -> float:
    """GB/s of ``total`` bytes read as random aligned ``size`` reads on ``threads`` threads."""
    fds = [os.open(p, os.O_RDONLY | os.O_DIRECT) for p in paths]
    try:
        spans = [(os.fstat(fd).st_size - size) // 4096 for fd in fds]
        reqs = [(k, random.randrange(spans[k]) * 4096) for k in (random.randrange(len(fds)) for _ in range(total // size))]

        def read(req: tuple[int, int]) -> int:
            return os.preadv(fds[req[0]], [mmap.mmap(-1, size)], req[1])

        t = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            got = sum(pool.map(read, reqs))
        return got / (time.perf_counter() - t) / 1e9
    finally:
        for fd in fds:
            os.close(fd)


def layer_reads(store: Store, shares: tuple[float, float], layers: int, gap: int, seed: int) -> tuple[float, int]:
    """(seconds, bytes) to read ``layers`` layers' FP16 and INT8 neurons of a random selection."""
    bundle_files.MERGE_GAP_BYTES = gap
    rng, F = np.random.default_rng(seed), store.num_neurons
    n16, n8 = int(shares[0] * F), int(shares[1] * F)
    backend, nbytes = FileBackend(direct=True), 0
    with ThreadPoolExecutor(2) as outer, ThreadPoolExecutor(8) as runs:
        t = time.perf_counter()
        for layer in range(layers):
            perm = rng.permutation(F)
            sel = {"fp16": np.sort(perm[:n16]), "int8": np.sort(perm[n16:n16 + n8])}
            nbytes += sum(store.run_bytes(p, ids) for p, ids in sel.items())
            list(outer.map(lambda item: store.read_neurons(layer % store.config.num_layers, item[0], item[1],
                                                           backend, runs), sel.items()))
        return time.perf_counter() - t, nbytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("store")
    ap.add_argument("--shares", default="0.1,0.2", help="FP16,INT8 shares of a layer's neurons read")
    ap.add_argument("--layers", type=int, default=8)
    args = ap.parse_args()
    store = Store(args.store)
    paths = [str(store.file_path(layer, p)) for layer in range(store.config.num_layers) for p in ("fp16", "int8")]
    print("random O_DIRECT reads, GB/s by threads")
    for size in (8 << 10, 32 << 10, 128 << 10, 1 << 20):
        total = (128 << 20) if size < (64 << 10) else (512 << 20)
        row = " ".join(f"T{t}={random_reads(paths, size, t, total):.2f}" for t in (1, 4, 16, 64))
        print(f"{size >> 10:>5} KiB  {row}", flush=True)
    f16, i8 = (float(x) for x in args.shares.split(","))
    print(f"{args.layers} layers' FP16 {f16:.0%} + INT8 {i8:.0%} neurons, cold")
    for gap in (32 << 10, 64 << 10, 128 << 10):
        dt, nbytes = layer_reads(store, (f16, i8), args.layers, gap, seed=gap)
        print(f"  merge gap {gap >> 10:>3} KiB: {dt:.2f} s, {nbytes / args.layers / 1e6:.0f} MB a layer", flush=True)


if __name__ == "__main__":
    main()
