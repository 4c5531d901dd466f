"""The bench's models and disk: the grown real model and the random 7B shape (cached), the disk's speed.

- :func:`grown_model` (the default, ``--model grown``): the demo model (SmolLM2-135M) grown 16-fold
  (``m2cache grow``: hidden 9216, 5.2 GB of FP16, the demo model's function and activation statistics), its
  split store, HF folder and GGUF files (F16, and llama.cpp's own Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_0).
- :func:`bench_model` (``--model 7b-random``): 8 layers of LLaMA-2-7B with random weights (about 3.7 GB of
  FP16) from ``m2cache synth``, the worst case (no locality, no meaningful perplexity), the same files.
Both are written once under ``~/.cache/m2cache``.
- :func:`disk_bandwidth`: the disk's ``O_DIRECT`` read bandwidth, measured now (4 MiB reads, one
  thread): the floor of every system is its disk bytes per token over this.
- :func:`evict` (the page cache before a cold run) and :func:`code_state` (the commit measured).
"""
from __future__ import annotations

import mmap
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from m2cache.storage.ssd import FileBackend

# imports inside functions: they load torch; the bench's children import this module (through
# m2cache.bench.harness), and a child holds torch only when its system runs on it

BENCH_SHAPE, BENCH_LAYERS = "llama2-7b", 8
GROWN_WIDTH = 16
GGUF_TYPES = ("f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0")  # export_gguf.ALL_TYPES
RANDOM_GGUF_TYPES = ("f16", "q8_0", "q4_k_m", "q4_0")  # speed only on random weights: the types that decide it
PLACE_TOKENS = 512  # calibration positions `m2cache place` counts the bench models' choices over
SPLIT = "store-split"  # where older versions wrote a split store beside the whole one (removed on upgrade)


def bench_model_dir() -> Path:
    from m2cache.offline.convert import CACHE_DIR

    return CACHE_DIR / f"synth-{BENCH_SHAPE}-L{BENCH_LAYERS}"


def grown_model_dir() -> Path:
    from m2cache.offline.convert import CACHE_DIR

    return CACHE_DIR / f"grown-smollm2-x{GROWN_WIDTH}"


def grown_model(root: Path | None = None, *, gguf: bool = True) -> dict[str, Any]:
    """``{"store", "split", "hf", "gguf"}`` of the grown model, writing what is missing (minutes; each step's
    time is printed and kept in ``grown.json``)."""
    from m2cache.offline.convert import fetch_demo
    from m2cache.offline.grow import grow

    root = root or grown_model_dir()
    store, hf = root / "store", root / "hf"
    if not ((store / "manifest.msgpack").is_file() and (hf / "config.json").is_file()):
        t0 = time.monotonic()
        print(f"[bench] growing the demo model x{GROWN_WIDTH} into {root} (once; minutes) ...", file=sys.stderr,
              flush=True)
        grow(fetch_demo(), root, GROWN_WIDTH)
        print(f"[bench] grown model written in {time.monotonic() - t0:.0f}s", file=sys.stderr, flush=True)
    out: dict[str, Any] = {"store": store, "split": ensure_split(store, root), "hf": hf, "gguf": {}}
    ensure_placed(store, root)
    if gguf:
        out["gguf"] = ensure_ggufs(store, root)
    return out


def ensure_placed(store: Path, root: Path) -> None:
    """``store`` laid out by use (``m2cache place``: each layer's neurons most chosen first, the same function),
    once: placed beside it, then put in its place. Measured on the grown model at 40%
    (``docs/results/bench_grown_40pct_levers.txt``): 1.14x the tokens/s of the checkpoint's order."""
    import shutil

    from m2cache.offline.place import place
    from m2cache.storage.reader import Store

    if Store(store).manifest.get("placement"):
        return
    t0 = time.monotonic()
    print(f"[bench] laying {store}'s neurons out by use (`m2cache place`, once) ...", file=sys.stderr, flush=True)
    placed = place(store, store.with_name(store.name + ".placed"), tokens=PLACE_TOKENS)
    old = store.with_name(store.name + ".unplaced")
    store.rename(old)
    placed.rename(store)
    shutil.rmtree(old)
    _record(root, "place_seconds", time.monotonic() - t0)


def ensure_split(store: Path, root: Path) -> Path:
    """The store the gate policies run from: ``store`` itself, laid out as format 3 (one store runs every
    policy; an older one is upgraded in place once, and the split store older versions wrote beside it,
    ``root/store-split``, removed); a current one gets what ``m2cache upgrade`` gives it: its INT8 attention
    in groups, this version's policy presets and default."""
    import shutil

    from m2cache.offline.upgrade import upgrade
    from m2cache.storage.reader import Store

    current = Store(store)
    if current.version < 3:
        t0 = time.monotonic()
        print(f"[bench] laying {store} out as one store for every policy (`m2cache upgrade`, once) ...",
              file=sys.stderr, flush=True)
        upgrade(store)
        _record(root, "upgrade_seconds", time.monotonic() - t0)
    else:
        if not (current.manifest.get("attention_int8") or {"group": 1}).get("group"):
            print(f"[bench] {store}'s INT8 attention written again in groups of 32 (once)", file=sys.stderr, flush=True)
        upgrade(store, progress=False)
    old = root / SPLIT
    if (old / "manifest.msgpack").is_file():
        shutil.rmtree(old)
    return store


def _record(root: Path, key: str, value: Any) -> None:
    """Keeps how long a model's files took to write in ``root/grown.json`` (what the bench's notes cite)."""
    import json

    path = root / "grown.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[key] = round(value, 1) if isinstance(value, float) else value
    path.write_text(json.dumps(data, indent=1))


def gguf_paths(root: Path, types: tuple[str, ...] = GGUF_TYPES) -> dict[str, Path]:
    return {t: root / "gguf" / f"model-{t}.gguf" for t in types}


def bench_model(root: Path | None = None, *, gguf: bool = True) -> dict[str, Any]:
    """``{"store", "hf", "gguf": {type: path}}`` of the bench model, writing what is missing (minutes)."""
    from m2cache.storage.reader import Store
    from m2cache.offline.synth import synth

    root = root or bench_model_dir()
    store, hf = root / "store", root / "hf"
    ready = (store / "manifest.msgpack").is_file() and (hf / "config.json").is_file()
    if ready and not Store(store).manifest.get("predictors"):
        ready = False
    if not ready:
        t0 = time.monotonic()
        print(f"[bench] writing the bench model ({BENCH_LAYERS} layers of {BENCH_SHAPE}) to {root} (once; "
              "a few minutes) ...", file=sys.stderr, flush=True)
        synth(root, BENCH_SHAPE, layers=BENCH_LAYERS, device="cpu")
        print(f"[bench] bench model written in {time.monotonic() - t0:.0f}s", file=sys.stderr, flush=True)
    out: dict[str, Any] = {"store": store, "split": ensure_split(store, root), "hf": hf, "gguf": {}}
    ensure_placed(store, root)
    if gguf:
        out["gguf"] = ensure_ggufs(store, root, RANDOM_GGUF_TYPES)
    return out


def ensure_ggufs(store: Path, root: Path, types: tuple[str, ...] = GGUF_TYPES) -> dict[str, Path]:
    """The model's GGUF files, written once: F16 from the store, every other type from the F16 file by
    llama.cpp's own quantizer (without llama-cpp-python: Q8_0 and Q4_0 by the gguf package, no K-quants)."""
    from m2cache.offline.export_gguf import TYPES, export_gguf, have_llama_quantizer

    paths = gguf_paths(root, types)
    for kind, path in paths.items():
        if path.is_file() or (kind not in TYPES and not have_llama_quantizer()):
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        print(f"[bench] writing the {kind} GGUF for llama.cpp -> {path} (once) ...", file=sys.stderr, flush=True)
        export_gguf(store, path, kind, f16=paths["f16"] if kind != "f16" and paths["f16"].is_file() else None)
        _record(root, f"gguf_{kind}_seconds", time.monotonic() - t0)
        print(f"[bench] {kind} GGUF written in {time.monotonic() - t0:.0f}s", file=sys.stderr, flush=True)
    return paths


def disk_bandwidth(files: list[Path], nbytes: int = 1 << 30, block: int = 4 << 20) -> dict[str, Any]:
    """Reads up to ``nbytes`` of ``files`` with ``O_DIRECT`` (bypassing the page cache) in ``block`` reads.

    Returns bytes/s, or None where the filesystem refuses ``O_DIRECT``."""
    buf = mmap.mmap(-1, block)  # page-aligned, as O_DIRECT requires
    done, t0 = 0, time.perf_counter()
    try:
        for f in files:
            fd = os.open(f, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
            try:
                size = os.fstat(fd).st_size // block * block
                off = 0
                while off < size and done < nbytes:
                    n = os.preadv(fd, [buf], off)
                    if n <= 0:
                        break
                    off, done = off + n, done + n
            finally:
                os.close(fd)
            if done >= nbytes:
                break
    except OSError as e:
        return {"bytes_per_s": None, "error": f"{type(e).__name__}: {e}"}
    dt = time.perf_counter() - t0
    return {"bytes_per_s": done / dt if dt > 0 and done else None, "bytes": done, "seconds": dt, "block": block,
            "files": [str(f) for f in files]}


def evict(paths: list[Path]) -> None:
    files = [f for p in paths if p.exists() for f in (p.rglob("*") if p.is_dir() else [p]) if f.is_file()]
    for d in [p for p in paths if p.is_dir()]:  # a store may link to its files (follow one level)
        files += [f for link in d.iterdir() if link.is_symlink() and link.is_dir() for f in link.rglob("*")]
    FileBackend().evict_page_cache(files)


def code_state() -> dict[str, Any]:
    """The commit measured, and the package files that differed from it (a shared tree can be mid-edit)."""
    root = Path(__file__).resolve().parent.parent

    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    dirty = git("status", "--porcelain", "--", "runtime", "actors", "model", "storage", "formats")
    return {"commit": git("rev-parse", "--short", "HEAD"), "uncommitted": dirty.splitlines()}
