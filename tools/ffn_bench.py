"""One FFN layer, one decode token: m2cache's sparse mixed-precision path against a dense BF16 FFN.

    python tools/ffn_bench.py [--shape demo|7b|both] [--policy 0.1,0.2,0.7] [--rank R] [--reps N]

Every cost of a decode step's FFN on the CPU is counted, in the engine's order, on one compute
thread: the low-rank predictor's score of every neuron, the ranking (``Policy.rank``), the policy's cut into
precision groups (``Policy.split``) — also shown alone as ``plan only`` — then the FFN over neuron rows that sit at scattered slots of
the pool — through the C kernels (``kernels``), or gathered and dequantised by torch (``torch``).
Against: the same layer dense, every weight resident in BF16 and in FP32 (one ``F.linear`` each for
gate and up, one matmul for down). Copies into the pool are not counted (the tiers' business).
Rows alternate, the order rotating each repetition; the median is reported with the ratio to dense.
The weights are random: speed does not depend on their values.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from m2cache.model import cpu_kernels
from m2cache.model.llama import ffn_bundles
from m2cache.formats.shares import Shares
from m2cache.model.policy import Policy
from m2cache.model.sparse_ffn import ffn_groups
from m2cache.formats import quant

SHAPES = {"demo": (576, 1536), "7b": (4096, 11008)}  # (hidden, FFN neurons)
GROUPS = quant.Groups()  # the store's defaults


def build(dim: int, neurons: int, shares: Shares, rank: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(neurons, 3, dim, generator=g) * 0.02
    policy = Policy(1, neurons, shares)
    # the pool holds this layer's rows among others' (4x as many slots), at random slots
    slot_of = {p: torch.randperm(4 * neurons, generator=g)[:neurons] for p in quant.PRECISIONS}
    pools = {}
    for p in quant.PRECISIONS:
        pool = torch.zeros(4 * neurons, quant.bundle_bytes(p, 3, dim, GROUPS), dtype=torch.uint8)
        pool[slot_of[p]] = quant.encode(p, w, GROUPS)
        pools[p] = pool
    w1 = torch.randn(rank, dim, generator=g) * 0.05
    w2 = torch.randn(neurons, rank, generator=g) * 0.05
    return w, policy, slot_of, pools, (w1, w2)


def make_rows(dim: int, neurons: int, shares: Shares, rank: int):
    w, policy, slot_of, pools, (w1, w2) = build(dim, neurons, shares, rank)
    h = torch.randn(1, dim)
    hb = h.bfloat16()
    w_bf16, w_f32 = w.bfloat16(), w

    def plan() -> dict[str, torch.Tensor]:
        scores = w2 @ torch.relu(w1 @ h[-1])  # the predictor: d -> r -> F (FP32, as the engine's default)
        ids = policy.split(0, policy.rank(0, scores))
        return {p: slot_of[p][torch.from_numpy(i)] for p, i in ids.items()}

    def kernels() -> torch.Tensor:
        slots = plan()
        out = torch.zeros(1, dim)
        for p, s in slots.items():
            cpu_kernels.ffn_group(p, pools[p], s, h, out, dim, GROUPS, "silu")
        return out

    def torch_path() -> torch.Tensor:
        slots = plan()
        raw = {p: pools[p].index_select(0, s) for p, s in slots.items()}
        return ffn_groups(hb, raw, 3, dim, GROUPS, F.silu, torch.bfloat16)

    rows = {"dense-bf16": lambda: ffn_bundles(hb, w_bf16, F.silu), "dense-fp32": lambda: ffn_bundles(h, w_f32, F.silu),
            "torch": torch_path, "plan only": plan}
    if cpu_kernels.available():
        rows["kernels"] = kernels
    return rows


def bench(rows: dict, reps: int, inner: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in rows}
    names = list(rows)
    for fn in rows.values():
        fn()  # warm up
    for r in range(reps):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            for _ in range(inner):
                rows[name]()
            times[name].append((time.perf_counter() - t0) / inner)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="both", choices=("demo", "7b", "both"))
    parser.add_argument("--policy", default="0.1,0.2,0.7", help="FP16,INT8,INT4 shares (default: the demo's default)")
    parser.add_argument("--rank", type=int, default=128, help="predictor rank")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the engine uses 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shares = Shares(*(float(v) for v in args.policy.split(",")))
    for shape in (["demo", "7b"] if args.shape == "both" else [args.shape]):
        dim, neurons = SHAPES[shape]
        rows = make_rows(dim, neurons, shares, args.rank)
        med = bench(rows, args.reps, inner=50 if shape == "demo" else 3)
        print(f"{shape}: hidden {dim}, {neurons} neurons, policy {args.policy}, {args.threads} thread(s)")
        for name, t in sorted(med.items(), key=lambda kv: kv[1]):
            print(f"  {name:11} {t * 1e3:9.3f} ms   {t / med['dense-bf16']:5.2f}x dense BF16")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
