#!/usr/bin/env bash
# The GPU checks, as one prepared run for a lent H100/H200 machine (about 8 minutes with the defaults and
# SYNTH_LAYERS=16, RUNS=2, DRAM=200% on an H100; fewer layers and TRACES="store-split:on" for a short one).
#
#   bash tools/gpu_check.sh [DEMO_STORE]        (from the repo root; results under $OUT)
#
# (0) the environment, and pinned / pageable host->device copy bandwidth;
# (1) `m2cache synth`: a LLaMA-2-7B-shaped store (hidden 4096, FFN 11008, 32 heads; SYNTH_LAYERS layers) and the
#     matching HF folder, written to the machine's disk, predictors fitted on the GPU;
# (a) correctness: tiered dense-fp16 on cuda gives the dense model's tokens (both fp32, on the GPU) — on the
#     demo store if one is given (argument, or $M2CACHE_HOME/smollm2-135m-instruct/store), else on the synth;
# (b) `m2cache bench --device cuda` on the synth store at an HBM budget of 25% of its FP16 FFN bytes: m2cache
#     vs accelerate offload at the same GPU budget vs all-resident transformers; then the bytes each moves
#     per decode token and the floor they imply at the measured copy bandwidth;
# (b2) the same bench of the store's split copy (`m2cache split-gate`: up/down bundles fetched, INT4 gate rows
#     resident on the GPU) under its default gate policy, at the same budgets in bytes, in turn and with
#     lookahead (layer L+1's rows moved while layer L computes);
# (c) a trace of the default policy on cuda at the same budgets, on the store and on its split copy:
#     tools/trace_table.py's ms per layer per span, and each step's wall time.
#
# Environment (all optional): OUT (default ./gpu_out), WORK (/tmp/m2cache-gpu), SYNTH_LAYERS (16: half
#   the depth keeps the whole run near 10 minutes; 32 for the full model if the lease has room),
#   TOKENS (8 new tokens per run), RUNS (3), HBM (25%), DRAM (30%),
#   SYSTEMS (m2cache,m2cache-dense-fp16,hf-bf16,hf-offload), CHECK_TOKENS (8), TRACE_TOKENS (24),
#   LOOKAHEAD ("off on": the split store's bench rows), TRACES ("store:off store-split:off store-split:on"),
#   RESIDENT (auto: the 'm2cache' row's attention and LM head form, the bench's --resident; int8 halves them).
# Needs python3 with torch+CUDA, transformers, accelerate, safetensors, tokenizers, msgpack, numpy, tqdm,
# jinja2 (the machines' image has them). zstandard (only trace files use it) is installed from a carried
# .whl/ folder when there is one, else replaced by a stub. m2cache is imported from this checkout through a
# symlink tree that mirrors pyproject's package-dir (runtime/ -> m2cache, actors/ -> m2cache.actors, ...):
# nothing is pip-installed.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$REPO/gpu_out}
WORK=${WORK:-/tmp/m2cache-gpu}
SYNTH_LAYERS=${SYNTH_LAYERS:-16}
TOKENS=${TOKENS:-8}
RUNS=${RUNS:-3}
HBM=${HBM:-25%}
DRAM=${DRAM:-30%}
SYSTEMS=${SYSTEMS:-m2cache,m2cache-dense-fp16,hf-bf16,hf-offload}
RESIDENT=${RESIDENT:-auto}
CHECK_TOKENS=${CHECK_TOKENS:-8}
TRACE_TOKENS=${TRACE_TOKENS:-24}
LOOKAHEAD=${LOOKAHEAD:-off on}
TRACES=${TRACES:-store:off store-split:off store-split:on}
DEMO=${1:-${M2CACHE_HOME:+$M2CACHE_HOME/smollm2-135m-instruct/store}}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT" "$WORK"
exec > >(tee -a "$OUT/log.txt") 2>&1
T0=$(date +%s)
stamp() { echo "=== [$(( $(date +%s) - T0 ))s] $*"; }

# ---- (0) environment ----------------------------------------------------------------------------
stamp "setup"
PKG="$WORK/pkg"
rm -rf "$PKG" && mkdir -p "$PKG/m2cache"
for f in "$REPO"/runtime/*; do ln -s "$f" "$PKG/m2cache/"; done
for sub in actors storage model formats; do ln -s "$REPO/$sub" "$PKG/m2cache/$sub"; done
# packages the image lacks come as carried wheels (.whl/, see the device README): crc32c (store
# checksums), gguf (reading the demo's .gguf), zstandard (trace files)
for mod in crc32c gguf zstandard; do
  if ! python3 -c "import $mod" 2>/dev/null && ls "$REPO"/.whl/$mod-*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$PKG" "$REPO"/.whl/$mod-*.whl
  fi
done
export PYTHONPATH="$PKG${PYTHONPATH:+:$PYTHONPATH}"
if ! python3 -c "import zstandard" 2>/dev/null; then
    echo "zstandard missing and not carried: a stub stands in (trace files cannot be written)"
    cat > "$PKG/zstandard.py" <<'EOF'
"""Stand-in for the missing zstandard package: m2cache imports it for trace files, which this run never writes."""


class _Missing:
    def __init__(self, *a, **k):
        raise RuntimeError("zstandard is not installed on this machine")


ZstdCompressor = ZstdDecompressor = _Missing
EOF
fi
m2c() { python3 -c 'import sys; from m2cache.cli.main import main; sys.exit(main(sys.argv[1:]))' "$@"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 - <<'EOF' || { echo "FATAL: the Python environment cannot run m2cache"; exit 2; }
import torch, transformers, accelerate, m2cache.engine.engine, m2cache.bench.harness, m2cache.offline.synth
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0))
print("transformers", transformers.__version__, "accelerate", accelerate.__version__)
assert torch.cuda.is_available()
EOF
df -h "$WORK" | tail -1; nproc; free -g | head -2

stamp "host->device copy bandwidth"
python3 - "$OUT/h2d.json" <<'EOF'
import json, sys, time, torch
n = 1 << 30
dst = torch.empty(n, dtype=torch.uint8, device="cuda")
out = {}
for kind, src in (("pinned", torch.ones(n, dtype=torch.uint8).pin_memory()), ("pageable", torch.ones(n, dtype=torch.uint8))):
    dst.copy_(src, non_blocking=True); torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(5):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    out[kind] = 5 * n / (time.perf_counter() - t)
    print(f"H2D {kind}: {out[kind] / 1e9:.1f} GB/s")
json.dump(out, open(sys.argv[1], "w"))
EOF

# ---- (1) the synthetic 7B-shaped model ---------------------------------------------------------
SYN="$WORK/synth7b-L$SYNTH_LAYERS"
if [ ! -f "$SYN/store/manifest.msgpack" ] || [ ! -f "$SYN/hf/config.json" ]; then
  stamp "synth llama2-7b shape, $SYNTH_LAYERS layers -> $SYN"
  m2c -v synth --shape llama2-7b "$SYN" --layers "$SYNTH_LAYERS" --device cuda || { echo "FATAL: synth failed"; exit 3; }
fi
if [ ! -f "$SYN/store-split/manifest.msgpack" ]; then
  stamp "split-gate -> $SYN/store-split"
  m2c split-gate "$SYN/store" "$SYN/store-split" || echo "split-gate failed: (b2) and the split trace will fail"
fi
du -sh "$SYN"/store "$SYN"/store-split "$SYN"/hf
# the budgets in bytes, from the whole store's FP16 FFN bytes: the split store's rows and the bench's share
# would resolve against its own (two thirds as large)
read -r HBM_B DRAM_B < <(python3 - "$SYN/store" "$HBM" "$DRAM" <<'EOF'
import sys
from m2cache.cli.main import resolve_budget
from m2cache.storage.reader import Store
store = Store(sys.argv[1])
print(resolve_budget(sys.argv[2], store), resolve_budget(sys.argv[3], store))
EOF
)
[ -n "$HBM_B" ] && [ -n "$DRAM_B" ] || { echo "FATAL: the budgets $HBM / $DRAM could not be resolved on $SYN/store"; exit 4; }
echo "budgets in bytes: hbm $HBM_B, dram $DRAM_B"

# ---- the demo model, from the .gguf carried in two halves (.gpu/a, .gpu/b: the carry limit is 64 MiB) ----
if [ -z "$DEMO" ] && [ -f "$REPO/.gpu/a/ggufpart.00" ] && [ -f "$REPO/.gpu/b/ggufpart.01" ]; then
  stamp "demo model from the carried .gguf"
  export M2CACHE_HOME="$WORK/home"
  mkdir -p "$M2CACHE_HOME/smollm2-135m-instruct"
  cat "$REPO/.gpu/a/ggufpart.00" "$REPO/.gpu/b/ggufpart.01" > "$M2CACHE_HOME/smollm2-135m-instruct/model.gguf"
  DEMO=$(python3 -c 'from m2cache.offline.convert import fetch_demo; print(fetch_demo(progress=False))' 2>"$OUT/demo_err.txt" | tail -1)
  [ -f "$DEMO/manifest.msgpack" ] || { echo "demo conversion failed: $(tail -3 "$OUT/demo_err.txt")"; DEMO=""; }
else
  echo "no demo .gguf halves carried: correctness runs on the synth store"
fi

# ---- (a) correctness ---------------------------------------------------------------------------
CHECK_STORE="$SYN/store"
if [ -n "$DEMO" ] && [ -f "$DEMO/manifest.msgpack" ]; then CHECK_STORE="$DEMO"; fi
stamp "(a) tiered dense-fp16 on cuda vs dense, on $CHECK_STORE"
python3 - "$CHECK_STORE" "$OUT/correctness.json" "$CHECK_TOKENS" "$HBM" "$DRAM" <<'EOF'
import asyncio, gc, json, sys, time, torch
from m2cache.cli.main import resolve_budget
from m2cache.engine.config import EngineConfig
from m2cache.engine.engine import Engine
from m2cache.engine.loading import load_dense, load_tokenizer
from m2cache.storage.reader import Store

store_dir, out, n, hbm, dram = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
store = Store(store_dir)
tok = load_tokenizer(store)
prompts = [tok.encode(p, raw=False) for p in ("Why is the sky blue?", "Write a haiku about a cache.",
                                               "List three uses of a cache.", "What is 2 + 2?")]
cfg = EngineConfig(hbm_budget=resolve_budget(hbm, store), dram_budget=resolve_budget(dram, store),
                   policy="dense-fp16", device="cuda", dtype="float32")

async def tiered():
    # the prompts run concurrently, so their decode steps are batched: the batch must give each its own
    # dense tokens too
    async with Engine.open(store_dir, cfg) as eng:
        async def one(p):
            return [t async for t in eng.generate_ids(p, n)]
        ids = list(await asyncio.gather(*(one(p) for p in prompts)))
        print(f"(a) decode steps by batch size: {dict(eng.executor.batch_sizes)}")
        return ids, eng.stats()

t = time.perf_counter()
tiered_ids, st = asyncio.run(tiered())
t_tiered = time.perf_counter() - t
gc.collect(); torch.cuda.empty_cache()
model = load_dense(store, torch.float32, "cuda")
eos = set(store.config.eos_token_ids)
dense_ids = []
for p in prompts:
    kv = model.new_cache()
    logits, got = model.forward(p, kv), []
    for _ in range(n):
        got.append(int(logits.argmax()))
        if got[-1] in eos:
            break
        logits = model.forward([got[-1]], kv)
    dense_ids.append(got)
same = tiered_ids == dense_ids
first_diff = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), None) for x, y in zip(tiered_ids, dense_ids)]
print(f"(a) tiered dense-fp16 (cuda, fp32, hbm {hbm}, dram {dram}) == dense: {same}; first differing position "
      f"per prompt: {first_diff}; tiered run {t_tiered:.1f}s; DRAM->device {st['bytes_per_token']['dram_to_hbm'] / 1e6:.1f}"
      f" MB/token, device hit ratio {st['hit_ratio']['hbm']:.1%}")
json.dump({"store": store_dir, "same_tokens": same, "first_diff": first_diff, "tiered": tiered_ids,
           "dense": dense_ids, "stats": {k: st[k] for k in ("bytes_per_token", "hit_ratio", "tiers")}},
          open(out, "w"), default=str)
EOF
echo "(a) exit code $?"

# ---- (b) the GPU bench -------------------------------------------------------------------------
stamp "(b) bench --device cuda on $SYN (hbm $HBM, dram $DRAM, $TOKENS tokens, $RUNS runs): $SYSTEMS"
python3 -m m2cache.bench.harness --store "$SYN/store" --hf "$SYN/hf" --device cuda --memory none --hbm-budget "$HBM" \
  --dram-budget "$DRAM" --tokens "$TOKENS" --runs "$RUNS" --prompts "Why is the sky blue?" --systems "$SYSTEMS" \
  --resident "$RESIDENT" \
  --child-timeout 240 --json "$OUT/bench_gpu.json"

for MODE in $LOOKAHEAD; do
  FLAG=""; SUFFIX=""
  if [ "$MODE" = on ]; then FLAG="--lookahead"; SUFFIX="_ahead"; fi
  stamp "(b2) bench --device cuda on the split store (hbm $HBM_B B, dram $DRAM_B B): m2cache, lookahead $MODE"
  python3 -m m2cache.bench.harness --store "$SYN/store-split" --hf "$SYN/hf" --device cuda --memory none \
    --hbm-budget "$HBM_B" --dram-budget "$DRAM_B" --tokens "$TOKENS" --runs "$RUNS" --prompts "Why is the sky blue?" \
    --systems m2cache --resident "$RESIDENT" --child-timeout 240 $FLAG --json "$OUT/bench_gpu_split$SUFFIX.json"
done

stamp "bytes moved per decode token, and the floor they imply"
python3 - "$OUT/bench_gpu.json" "$OUT/h2d.json" "$OUT/bench_gpu_split.json" "$OUT/bench_gpu_split_ahead.json" <<'EOF' | tee "$OUT/summary.txt"
import json, os, sys
rep, bw = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
print(f"H2D copy: pinned {bw['pinned'] / 1e9:.1f} GB/s, pageable {bw['pageable'] / 1e9:.1f} GB/s")
systems = dict(rep["limits"][0]["systems"])
for path, tag in ((sys.argv[3], "-split"), (sys.argv[4], "-split-ahead")):  # the split store's rows, own runs
    if os.path.exists(path):
        systems.update({f"{k}{tag}": v for k, v in json.load(open(path))["limits"][0]["systems"].items()})
for name, r in systems.items():
    moved, rate = r.get("moved_bytes_per_token"), r.get("decode_tokens_per_s")
    line = f"{name:<20} decode {rate or 0:8.2f} tok/s"
    if r.get("peak_device_bytes"):
        line += f", peak GPU {r['peak_device_bytes'] / 1e9:5.1f} GB"
    if moved:
        # m2cache copies from pinned staging; accelerate's offload copies pageable CPU weights
        src = "pageable" if name == "hf-offload" else "pinned"
        floor = moved / bw[src]
        line += (f", moves {moved / 1e9:6.3f} GB/token -> copy floor {floor * 1e3:7.1f} ms/token "
                 f"(<= {1 / floor:6.1f} tok/s at {src} bandwidth); at {rate * floor:.0%} of that ceiling" if rate
                 else f", moves {moved / 1e9:.3f} GB/token")
    print(line)
    for e in r.get("errors", []):
        print(f"{'':<20} failed: {e}")
rate = {k: v.get("decode_tokens_per_s") or 0 for k, v in systems.items()}
for s in ("m2cache", "m2cache-split", "m2cache-split-ahead", "m2cache-dense-fp16"):
    if rate.get(s):
        print(f"{s}: " + ", ".join(f"x{rate[s] / rate[b]:.2f} {b}" for b in ("m2cache-dense-fp16", "hf-offload", "hf-bf16")
                                   if rate.get(b)))
EOF
# ---- (c) where the default policy's time goes on the GPU -----------------------------------------
# The trace is recorded in memory (no file: zstandard may be a stub here) and summarised in-process with
# tools/trace_table.py's table: ms per layer per (actor, span), over the decode steps; then each step's
# wall time (the first decode steps may pay for layers not yet in DRAM).
for T in $TRACES; do
KIND=${T%%:*}; MODE=${T##*:}
stamp "(c) trace of the default policy on cuda, $KIND, lookahead $MODE ($TRACE_TOKENS tokens, hbm $HBM_B B, dram $DRAM_B B)"
timeout 300 python3 - "$SYN/$KIND" "$TRACE_TOKENS" "$HBM_B" "$DRAM_B" "$REPO/tools" "$MODE" <<'EOF'  # (in log.txt)
import asyncio, collections, sys
from m2cache.cli.main import resolve_budget
from m2cache.engine.config import EngineConfig
from m2cache.engine.engine import Engine
from m2cache.storage.reader import Store

store_dir, n, hbm, dram, tools, ahead = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6] == "on"
sys.path.insert(0, tools)
from trace_table import table

store = Store(store_dir)
cfg = EngineConfig(hbm_budget=resolve_budget(hbm, store), dram_budget=resolve_budget(dram, store), device="cuda",
                   dtype="float16", direct_io=True, io_threads=2, trace=True, lookahead=ahead)

async def main():
    async with Engine.open(store_dir, cfg) as eng:
        ids = eng.tokenizer.encode("Why is the sky blue?", raw=False)
        got = [t async for t in eng.generate_ids(ids, n)]
        st = eng.stats()
        print(f"(c) policy {st['policy']}: {len(got)} tokens, decode {st['decode_tokens_per_s']:.2f} tok/s, "
              f"stall fraction {st['stall_fraction']:.1%}, hit ratio {st['hit_ratio']}, MB/token "
              f"{ {k: round(v / 1e6, 1) for k, v in st['bytes_per_token'].items()} }, tiers {st['tiers']}")
        print(table(eng.recorder))
        begin, end = collections.defaultdict(lambda: 1 << 62), collections.Counter()
        for s in eng.recorder.spans():
            if s.actor == "executor" and s.step > 0:
                begin[s.step] = min(begin[s.step], s.start_ns)
                end[s.step] = max(end[s.step], s.start_ns + s.duration_ns)
        print("wall ms per step (the first is the prefill):",
              " ".join(f"{k}:{(end[k] - begin[k]) / 1e6:.0f}" for k in sorted(begin)))

asyncio.run(main())
EOF
echo "(c) $KIND lookahead $MODE exit code $?"
done

stamp "done; results in $OUT"
