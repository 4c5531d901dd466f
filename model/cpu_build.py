"""The CPU kernels' library (``csrc/``): its ABI as ctypes sees it, built on first use and loaded.

The sources are compiled once per machine with the system C compiler (``cc``, or ``$CC``) into
``~/.cache/m2cache/kernels`` (``M2CACHE_HOME``), named by a hash of the sources, flags, compiler and CPU, and
loaded with ctypes. Where no compiler is found, or ``M2CACHE_KERNELS=0``, ``library()`` is None and callers use
the torch path; the first failure is logged once with its reason. ``ABI`` is every function of
``csrc/m2cache.h`` with its argument and result types (a test reads the header against it).

Why at first use and not at install (a setuptools extension): the kernels are built for the CPU that runs them
(``-march=native``: AVX2/F16C here, whatever the next machine has there), which a wheel built elsewhere cannot
know; a machine without a compiler still installs and runs m2cache, on the torch path; and the build key
includes the CPU's flags, so a home directory shared between machines keeps one build per CPU. The cost is
one compile (a few seconds on 2 cores) the first time. The flags are fixed below: warnings on (``-Wall -Wextra``; the test
build adds ``-Werror``), no ``-ffast-math`` (see FLAGS), and the kernels' rounding, where it differs from
float32 products, is written down and mirrored in torch for the tests (``model/kernel_reference.py``).
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

log = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
SOURCES = (CSRC / "sparse_ffn.c", CSRC / "gate.c", CSRC / "attention.c", CSRC / "decode.c", CSRC / "threads.c")
HEADERS = (CSRC / "m2cache.h", CSRC / "kernels.h", CSRC / "simd.h", CSRC / "threads.h", CSRC / "block_down.h")
# No -ffast-math: with gcc < 13 it links crtfastmath into the library, whose constructor turns on
# flush-to-zero for the whole process when it loads (torch's denormals included); the kernels' loops are
# vectorised by hand (simd.h), so float sums keep the order written. -fno-math-errno: libm calls may
# skip setting errno (sqrtf, lrintf inline).
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-Wall", "-Wextra", "-fPIC", "-shared")

_P, _I64, _I32, _F32, _U64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_uint64
_FFN = [_P, _I64, _I64, _P, _I64, _P, _I64, _I64]  # pool, rows, bundle bytes, slots, n, h, T, D
ABI: dict[str, tuple[list, type | None]] = {
    "m2c_set_threads": ([_I32], _I32),
    "m2c_threads": ([], _I32),
    "m2c_spin": ([_I32], None),
    "m2c_set_spin_ns": ([_I64], _I64),
    "m2c_set_int8_activations": ([_I32], _I32),
    "m2c_int8_activations": ([], _I32),
    "m2c_block_down": ([_I32, _I64, _I64], _I32),
    "m2c_ffn_fp16": ([*_FFN, _I32, _I64, _P, _P], _I32),  # act, parts, gact, out
    "m2c_ffn_int8": ([*_FFN, _I64, _I32, _I64, _P, _P], _I32),  # the group size first
    "m2c_ffn_int4": ([*_FFN, _I64, _I32, _I64, _P, _P], _I32),
    "m2c_ffn_groups": ([_I32, _P, _P, _P, _P, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _I32, _I64, _P], _I32),
    "m2c_gate_int4": ([_P, _I64, _P, _I64, _I64, _I64, _I32, _P], _I32),
    "m2c_copy_rows": ([_P, _I64, _P, _P, _I64, _P, _I64, _I64], _I32),
    "m2c_read_rows": ([_P, _P, _I64, _I64], _U64),
    "m2c_attn_decode": ([_P, _P, _F32, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _I64, _P, _P, _P, _I64, _I64, _P, _P, _P,
                         _I32],
                        _I32),
    "m2c_matvec": ([_P, _P, _F32, _P, _P, _I64, _I64, _I64, _I32, _P], _I32),
    "m2c_decode": ([_P, _P, _I64, _P, _P, _I64, _I64, _P, _P, _P, _P], _I32),
}

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_failed: str | None = None


def _cache_dir() -> Path:
    home = Path(os.environ.get("M2CACHE_HOME", Path.home() / ".cache" / "m2cache"))
    return home / "kernels"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _build() -> ctypes.CDLL:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc or gcc) on PATH")
    src = b"".join(path.read_bytes() for path in SOURCES + HEADERS)
    key = hashlib.sha256(src + " ".join(FLAGS).encode() + _cpu_flags().encode() + cc.encode()).hexdigest()[:16]
    out = _cache_dir() / f"m2cache-{key}.so"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            so = Path(tmp) / out.name
            done = subprocess.run([cc, *FLAGS, "-o", str(so), *map(str, SOURCES), "-lm", "-lpthread"], capture_output=True,
                                  text=True)
            if done.returncode != 0:
                raise RuntimeError(f"{cc} failed: {done.stderr.strip()[-500:]}")
            os.replace(so, out)  # atomic: a concurrent build of the same key leaves one good file
    lib = ctypes.CDLL(str(out))
    for name, (args, result) in ABI.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, result
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernels, built if needed; None where they cannot be had (reason logged once)."""
    global _lib, _failed
    if _lib is not None or _failed is not None:
        return _lib
    with _lock:
        if _lib is None and _failed is None:
            if os.environ.get("M2CACHE_KERNELS", "1") == "0":
                _failed = "disabled by M2CACHE_KERNELS=0"
            else:
                try:
                    _lib = _build()
                except (OSError, RuntimeError) as e:
                    _failed = str(e)
                    log.warning("m2cache CPU kernels unavailable (%s); using the slower torch path", e)
    return _lib


def available() -> bool:
    return library() is not None
