"""memlimit: parsing and refusing limits, and a balloon that never outlives its parent (a small one)."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from m2cache.errors import ConfigError
from m2cache.bench.memlimit import MIN_LIMIT, RESERVE, Balloon, check_limit, parse_memory

GB = 10**9


def test_memory_is_a_share_of_the_fp16_bytes_a_size_or_none() -> None:
    assert parse_memory("40%", 10 * GB) == 4 * GB
    assert parse_memory("3GB", 10 * GB) == 3 * GB
    assert parse_memory("1.5GiB", 0) == int(1.5 * 2**30)
    assert parse_memory("none", 10 * GB) is None
    assert parse_memory(None, 10 * GB) is None


@pytest.mark.parametrize("bad", ["x%", "0%", "lots"])
def test_an_unreadable_memory_value_is_refused_with_the_forms_it_takes(bad: str) -> None:
    with pytest.raises(ConfigError, match="40%|size"):
        parse_memory(bad, 10 * GB)


def test_a_limit_below_what_a_process_needs_is_refused() -> None:
    with pytest.raises(ConfigError, match="at least"):
        check_limit(MIN_LIMIT - 1, 20 * GB, "cgroup")


def test_a_balloon_limit_that_would_starve_the_machine_is_refused() -> None:
    with pytest.raises(ConfigError, match="starve"):
        check_limit(MIN_LIMIT, 20 * GB, "balloon")


def test_a_limit_above_what_the_machine_has_is_refused() -> None:
    with pytest.raises(ConfigError, match="at most"):
        check_limit(20 * GB - RESERVE + 1, 20 * GB, "cgroup")
    check_limit(20 * GB - RESERVE, 20 * GB, "cgroup")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_a_balloon_is_first_to_go_and_removed_when_done() -> None:
    b = Balloon(32 << 20)
    pid = b.proc.pid
    assert Path(f"/proc/{pid}/oom_score_adj").read_text().strip() == "1000"
    assert int(Path(f"/proc/{pid}/status").read_text().split("VmRSS:")[1].split()[0]) * 1024 >= 32 << 20
    b.remove()
    assert not _alive(pid)


def test_a_balloon_dies_with_a_parent_that_is_killed() -> None:
    code = ("import os, sys; from m2cache.bench.memlimit import Balloon; b = Balloon(16 << 20); "
            "print(b.proc.pid, flush=True); os.kill(os.getpid(), 9)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    pid = int(out.stdout.split()[0])
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid)
