#!/usr/bin/env bash
# Batched decode through the tiers on a lent GPU: tools/batch_bench.py on a 7B-shaped store at HBM 25%
# (the model does not fit the device budget), default policy for 1..16 concurrent requests, then
# dense-fp16 for 1 and 8. About 4 minutes with the defaults. Set-up as tools/gpu_check.sh (symlink tree,
# carried .whl/ wheels); results under $OUT.
#
#   bash tools/gpu_batch.sh        env: OUT, WORK, SYNTH_LAYERS (8), TOKENS (16), CLIENTS (1,2,4,8,16), HBM, DRAM
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$REPO/gpu_out}; WORK=${WORK:-/tmp/m2cache-gpu}
SYNTH_LAYERS=${SYNTH_LAYERS:-8}; TOKENS=${TOKENS:-16}; CLIENTS=${CLIENTS:-1,2,4,8,16}; HBM=${HBM:-25%}; DRAM=${DRAM:-200%}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT" "$WORK"
exec > >(tee -a "$OUT/batch_log.txt") 2>&1
PKG="$WORK/pkg"; rm -rf "$PKG" && mkdir -p "$PKG/m2cache"
for f in "$REPO"/runtime/*; do ln -s "$f" "$PKG/m2cache/"; done
for sub in actors storage model formats; do ln -s "$REPO/$sub" "$PKG/m2cache/$sub"; done
for mod in crc32c zstandard; do
  if ! python3 -c "import $mod" 2>/dev/null && ls "$REPO"/.whl/$mod-*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$PKG" "$REPO"/.whl/$mod-*.whl
  fi
done
export PYTHONPATH="$PKG${PYTHONPATH:+:$PYTHONPATH}"
m2c() { python3 -c 'import sys; from m2cache.cli.main import main; sys.exit(main(sys.argv[1:]))' "$@"; }
SYN="$WORK/synth7b-L$SYNTH_LAYERS"
if [ ! -f "$SYN/store/manifest.msgpack" ]; then
  m2c synth --shape llama2-7b "$SYN" --layers "$SYNTH_LAYERS" --device cuda 2>&1 | grep -v "step/s" || exit 3
fi
echo "=== default policy, hbm $HBM, dram $DRAM, $TOKENS tokens"
python3 "$REPO/tools/batch_bench.py" "$SYN/store" --device cuda --hbm "$HBM" --dram "$DRAM" --tokens "$TOKENS" \
  --clients "$CLIENTS" --json "$OUT/batch_default.json"
echo "=== dense-fp16"
python3 "$REPO/tools/batch_bench.py" "$SYN/store" --device cuda --hbm "$HBM" --dram "$DRAM" --tokens "$TOKENS" \
  --clients 1,8 --policy dense-fp16 --json "$OUT/batch_dense.json"
