"""A real memory limit — resident memory and page cache together — for the processes a bench starts.

Two mechanisms, the first that works:

- ``cgroup``: the kernel's memory controller. A fresh child cgroup per run under this process's own
  (cgroup v2 ``memory.max``, or v1 ``memory.limit_in_bytes``); the child joins it before ``exec``, so
  everything it maps or reads into the page cache is charged to it and the kernel reclaims (or, for
  anonymous memory, OOM-kills) at the limit. Only the child is limited; the rest of the machine is not.
- ``balloon``: a helper process that holds and touches ``MemAvailable - limit`` bytes of anonymous
  memory, so the whole machine (no swap) has only ``limit`` left and the page cache must shrink. Its
  ``oom_score_adj`` is 1000 (the first to go), and it dies with its parent (``PR_SET_PDEATHSIG``, and a
  pipe whose closing it waits for), so it is removed at exit whatever happens.

``--memory`` values: a size (``3GB``), a share of the model's FP16 weight bytes (``40%``) or ``none``.
A limit that would starve the machine (below what one Python process with torch needs, or above what
the machine has available) is refused with a :class:`~m2cache.errors.ConfigError`.
"""
from __future__ import annotations

import ctypes
import itertools
import logging
import mmap
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from m2cache.engine.config import format_size, parse_size
from m2cache.errors import ConfigError

log = logging.getLogger(__name__)

MECHANISMS = ("auto", "cgroup", "balloon")
MIN_LIMIT = 512 << 20  # one Python process with torch imported holds ~300 MB before any weight
RESERVE = 1 << 30  # what a limit must leave to the rest of the machine
BALLOON_MIN_LIMIT = 1 << 30  # a balloon squeezes the whole machine: below this everything else starves
_PR_SET_PDEATHSIG = 1


def parse_memory(value: str | None, fp16_bytes: int) -> int | None:
    """``"40%"`` (of ``fp16_bytes``), a size such as ``"3GB"``, or ``"none"``/None -> bytes or None."""
    if value is None or str(value).strip().lower() in ("none", ""):
        return None
    v = str(value).strip()
    if v.endswith("%"):
        try:
            share = float(v[:-1]) / 100
        except ValueError:
            raise ConfigError(f"--memory {value!r}: write a share such as '40%', a size such as '3GB', or 'none'")
        if share <= 0:
            raise ConfigError(f"--memory {value!r} must be above 0%: write a share such as '40%'")
        return int(share * fp16_bytes)
    return parse_size(v, "--memory")


def ffn_fp16_bytes(store) -> int:
    return store.layer_bytes("fp16") * store.config.num_layers


def resolve_budget(value: str, store) -> int | str:
    """``"20%"`` means 20% of the store's FP16 FFN bytes; anything else is a size for EngineConfig."""
    if isinstance(value, str) and value.strip().endswith("%"):
        return int(float(value.strip()[:-1]) / 100 * ffn_fp16_bytes(store))
    return value


def mem_available() -> int:
    """``MemAvailable`` of /proc/meminfo, in bytes."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable line")


def check_limit(limit: int, available: int, mechanism: str) -> None:
    """Refuses a limit the systems cannot run in, or one that would starve the machine."""
    floor = BALLOON_MIN_LIMIT if mechanism == "balloon" else MIN_LIMIT
    if limit < floor:
        raise ConfigError(f"--memory {format_size(limit)} is below {format_size(floor)}: "
                          + ("a balloon leaves that much to the whole machine, which would starve it"
                             if mechanism == "balloon" else "one Python process with torch needs about that much")
                          + f"; give at least {format_size(floor)}")
    if limit > available - RESERVE:
        raise ConfigError(f"--memory {format_size(limit)} is more than this machine can give: MemAvailable is "
                          f"{format_size(available)} and {format_size(RESERVE)} stays for everything else; give "
                          f"at most {format_size(available - RESERVE)}, or 'none' for no limit")


# ---- cgroup --------------------------------------------------------------------------------------
def _own_cgroups() -> dict[str, str]:
    """controller (or '' for v2) -> this process's cgroup path."""
    out = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, ctrls, path = line.split(":", 2)
        for c in ctrls.split(",") if ctrls else [""]:
            out[c] = path
    return out


def _mounts() -> list[tuple[str, str, str]]:
    """(mount point, fs type, super options) of the cgroup mounts."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, right = line.split(" - ", 1)
        fstype, _, opts = right.split(" ", 2)
        if fstype in ("cgroup", "cgroup2"):
            out.append((left.split()[4], fstype, opts))
    return out


def find_cgroup_parent() -> tuple[Path, int] | None:
    """(a folder where a child memory cgroup can be made, cgroup version), or None."""
    own = _own_cgroups()
    for mount, fstype, opts in _mounts():
        if fstype == "cgroup2" and "" in own:
            parent = Path(mount) / own[""].lstrip("/")
            ctrl = parent / "cgroup.subtree_control"
            if ctrl.is_file() and "memory" in ctrl.read_text().split() and os.access(parent, os.W_OK):
                return parent, 2
        if fstype == "cgroup" and "memory" in opts.split(",") and "memory" in own:
            parent = Path(mount) / own["memory"].lstrip("/")
            if (parent / "memory.limit_in_bytes").is_file() and os.access(parent, os.W_OK):
                return parent, 1
    return None


class CgroupRun:
    """One run's cgroup: made with the limit, joined by the child, removed after it."""

    _ids = itertools.count()

    def __init__(self, parent: Path, version: int, limit: int) -> None:
        self.version = version
        self.path = parent / f"m2cache-bench-{os.getpid()}-{next(self._ids)}"
        self.path.mkdir()
        limit_file = "memory.max" if version == 2 else "memory.limit_in_bytes"
        try:
            (self.path / limit_file).write_text(str(limit))
            if version == 2 and (self.path / "memory.swap.max").exists():
                (self.path / "memory.swap.max").write_text("0")
        except OSError:
            self.remove()
            raise

    def join(self) -> None:
        """In the child, before exec: move this process into the cgroup."""
        with open(self.path / "cgroup.procs", "w") as f:
            f.write(str(os.getpid()))

    def figures(self) -> dict[str, Any]:
        """Peak usage (RSS + page cache) and OOM kills, where the kernel tells them."""
        out: dict[str, Any] = {}
        peak = self.path / ("memory.peak" if self.version == 2 else "memory.max_usage_in_bytes")
        if peak.is_file():
            out["cgroup_peak_bytes"] = int(peak.read_text())
        events = self.path / ("memory.events" if self.version == 2 else "memory.oom_control")
        if events.is_file():
            kv = dict(line.split() for line in events.read_text().splitlines() if len(line.split()) == 2)
            if "oom_kill" in kv:
                out["oom_kills"] = int(kv["oom_kill"])
        return out

    def remove(self) -> None:
        for _ in range(50):  # a dying child may take a moment to leave
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)
        log.warning("could not remove cgroup %s", self.path)


# ---- balloon ------------------------------------------------------------------------------------
def balloon_main(nbytes: int) -> int:
    """The helper: hold ``nbytes`` of touched anonymous memory until stdin closes (the parent is gone)."""
    Path("/proc/self/oom_score_adj").write_text("1000")
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # the stdin pipe still ends us with the parent
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    chunk = b"\x01" * (64 << 20)
    for off in range(0, nbytes, len(chunk)):
        buf.write(chunk[: min(len(chunk), nbytes - off)])  # a write fault per page: every page is real
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    sys.stdin.read()  # returns at EOF: the parent closed the pipe or died
    return 0


class Balloon:
    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        cmd = [sys.executable, "-m", "m2cache.bench.memlimit", "--balloon", str(nbytes)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            self.remove()
            raise ConfigError(f"the memory balloon ({format_size(nbytes)}) did not inflate (exit "
                              f"{self.proc.poll()}); the machine may not have that much free: give a larger --memory")

    def remove(self) -> None:
        if self.proc.poll() is None:
            try:
                if self.proc.stdin:
                    self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ---- the limit a bench holds for its runs -------------------------------------------------------
class MemoryLimit:
    """``with MemoryLimit(limit) as ml:`` then, per run, ``ml.run(cmd, timeout)``.

    ``limit=None`` runs unlimited (mechanism ``none``). ``mechanism``: auto (cgroup where the machine
    allows, else balloon), cgroup or balloon.
    """

    def __init__(self, limit: int | None, mechanism: str = "auto") -> None:
        if mechanism not in MECHANISMS:
            raise ConfigError(f"mechanism must be one of {', '.join(MECHANISMS)}, got {mechanism!r}")
        self.limit, self.requested = limit, mechanism
        self.mechanism = "none"
        self.available_before = mem_available()
        self._cgroup: tuple[Path, int] | None = None
        self._balloon: Balloon | None = None
        self.last_run: dict[str, Any] = {}

    def __enter__(self) -> "MemoryLimit":
        if self.limit is None:
            return self
        cg = find_cgroup_parent() if self.requested in ("auto", "cgroup") else None
        if cg is None and self.requested == "cgroup":
            raise ConfigError("no writable memory cgroup here (cgroup v2 with the memory controller delegated, "
                              "or v1's memory hierarchy; needs root): use mechanism 'balloon' or 'auto'")
        mech = f"cgroup-v{cg[1]}" if cg else "balloon"
        check_limit(self.limit, self.available_before, "balloon" if cg is None else "cgroup")
        if cg is not None:
            CgroupRun(*cg, self.limit).remove()  # fail here, not in the first child, if the limit cannot be set
            self._cgroup = cg
        else:
            self._balloon = Balloon(self.available_before - self.limit)
        self.mechanism = mech
        return self

    def __exit__(self, *exc: object) -> None:
        if self._balloon is not None:
            self._balloon.remove()
            self._balloon = None

    def describe(self) -> dict[str, Any]:
        return {"mechanism": self.mechanism, "limit_bytes": self.limit,
                "mem_available_before": self.available_before,
                "balloon_bytes": self._balloon.nbytes if self._balloon else None}

    def run(self, cmd: list[str], timeout: float | None, capture: bool = True,
            forward_signals: bool = False) -> subprocess.CompletedProcess:
        """Runs ``cmd`` under the limit (its output captured, or passed through); ``last_run`` gets the
        cgroup's figures. Raises TimeoutExpired. ``forward_signals``: SIGTERM and SIGINT sent to this process
        go to the child, which ends on its own terms (a server drains), and the cgroup is still removed."""
        run_cg = CgroupRun(*self._cgroup, self.limit) if self._cgroup and self.limit else None
        preexec: Callable[[], None] | None = run_cg.join if run_cg else None
        try:
            if forward_signals:
                proc = _run_forwarding(cmd, preexec)
            else:
                proc = subprocess.run(cmd, capture_output=capture, text=True, timeout=timeout, preexec_fn=preexec)
            self.last_run = run_cg.figures() if run_cg else {}
            if proc.returncode == -signal.SIGKILL and self.limit:
                self.last_run["killed"] = True
            return proc
        finally:
            if run_cg:
                run_cg.remove()


def _run_forwarding(cmd: list[str], preexec: Callable[[], None] | None) -> subprocess.CompletedProcess:
    """``cmd`` to its end, its output passed through, SIGTERM and SIGINT forwarded to it."""
    child = subprocess.Popen(cmd, preexec_fn=preexec)
    forward = {sig: signal.signal(sig, lambda s, _f: child.send_signal(s)) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        rc = child.wait()
    finally:
        for sig, before in forward.items():
            signal.signal(sig, before)
    return subprocess.CompletedProcess(cmd, rc)


def rerun_under_limit(argv: list[str], value: str, fp16_bytes: int, forward_signals: bool = False) -> int:
    """``generate --memory`` (and ``demo``): runs this command again under the limit, the switch kept so the
    engine inside sizes itself from it (``UNDER_LIMIT_ENV`` stops a second rerun); its exit code."""
    limit = parse_memory(value, fp16_bytes)
    if limit is None:
        return -1
    with MemoryLimit(limit) as ml:
        log.warning("running under a %s memory limit (%s)", format_size(limit), ml.mechanism)
        env_cmd = [sys.executable, "-m", "m2cache.cli.main", *argv]
        os.environ[UNDER_LIMIT_ENV] = "1"
        return ml.run(env_cmd, None, capture=False, forward_signals=forward_signals).returncode


UNDER_LIMIT_ENV = "M2CACHE_UNDER_MEMORY_LIMIT"


def seen_by_this_process() -> dict[str, Any]:
    """What a child sees at its start: MemAvailable, and its cgroup's limit and usage when it has one."""
    out: dict[str, Any] = {"mem_available": mem_available()}
    own = _own_cgroups()
    for mount, fstype, opts in _mounts():
        if fstype == "cgroup" and "memory" in opts.split(",") and "memory" in own:
            d = Path(mount) / own["memory"].lstrip("/")
            files = ("memory.limit_in_bytes", "memory.usage_in_bytes")
        elif fstype == "cgroup2" and "" in own:
            d = Path(mount) / own[""].lstrip("/")
            files = ("memory.max", "memory.current")
        else:
            continue
        raw = (d / files[0]).read_text().strip() if (d / files[0]).is_file() else "max"
        if raw != "max" and int(raw) < 1 << 62:  # v1 writes "no limit" as a huge number
            limit, usage = int((d / files[0]).read_text()), int((d / files[1]).read_text())
            out |= {"cgroup_limit": limit, "cgroup_usage": usage, "cgroup_available": limit - usage,
                    "available": min(limit - usage, out["mem_available"])}
            return out
    out["available"] = out["mem_available"]
    return out


if __name__ == "__main__":
    if sys.argv[1:2] == ["--balloon"]:
        sys.exit(balloon_main(int(sys.argv[2])))
    sys.exit(f"usage: python -m m2cache.bench.memlimit --balloon BYTES (got {sys.argv[1:]})")
