"""The bench's model and disk: the default 7B-shaped model (cached), the sizes each system needs, the disk's speed.

- :func:`bench_model`: 8 layers of LLaMA-2-7B (about 3.7 GB of FP16 with embeddings and head) from
  ``m2cache synth``, with its HF folder and GGUF exports, written once under ``~/.cache/m2cache``.
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

BENCH_SHAPE, BENCH_LAYERS = "llama2-7b", 8
GGUF_TYPES = ("f16", "q8_0", "q4_0")


def bench_model_dir() -> Path:
    from m2cache.offline.convert import CACHE_DIR  # imports torch: not at the top, the bench's children import this module

    return CACHE_DIR / f"synth-{BENCH_SHAPE}-L{BENCH_LAYERS}"


def gguf_paths(root: Path) -> dict[str, Path]:
    return {t: root / "gguf" / f"model-{t}.gguf" for t in GGUF_TYPES}


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
    out: dict[str, Any] = {"store": store, "hf": hf, "gguf": {}}
    if gguf:
        out["gguf"] = ensure_ggufs(store, root)
    return out


def ensure_ggufs(store: Path, root: Path) -> dict[str, Path]:
    from m2cache.offline.export_gguf import export_gguf

    paths = gguf_paths(root)
    for kind, path in paths.items():
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            t0 = time.monotonic()
            print(f"[bench] exporting {kind} GGUF for llama.cpp -> {path} (once) ...", file=sys.stderr, flush=True)
            export_gguf(store, path, kind)
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
    from m2cache.storage.ssd import FileBackend

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

    dirty = git("status", "--porcelain", "--", "runtime", "actors", "model", "storage")
    return {"commit": git("rev-parse", "--short", "HEAD"), "uncommitted": dirty.splitlines()}
