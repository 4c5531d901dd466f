"""The bench's memory limit really limits (``make stress``: the balloon squeezes the whole machine).

A child reads a file twice the limit, twice: under the limit the page cache cannot keep it, so the
second pass comes from the disk again (``/proc/self/io`` read_bytes); without a limit it does not."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from m2cache.bench.memlimit import MemoryLimit, find_cgroup_parent

pytestmark = pytest.mark.stress
LIMIT = 1 << 30  # the balloon's smallest: it leaves that much to the whole machine

READ_TWICE = """
import sys
def disk():
    with open("/proc/self/io") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("read_bytes"))
for _ in range(2):
    before = disk()
    with open(sys.argv[1], "rb", buffering=0) as f:
        while f.read(8 << 20):
            pass
    print(disk() - before)
"""


@pytest.fixture(scope="module")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2x the limit of incompressible bytes, on the disk (not tmpfs) and out of the page cache."""
    path = Path(os.environ.get("M2CACHE_STRESS_DIR", Path.home() / ".cache" / "m2cache")) / "stress-read-twice.bin"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file() or path.stat().st_size != 2 * LIMIT:
        chunk = os.urandom(64 << 20)
        with open(path, "wb") as f:
            for _ in range(2 * LIMIT // len(chunk)):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
    yield path


def read_twice(path: Path, limiter: MemoryLimit) -> list[int]:
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    proc = limiter.run([sys.executable, "-c", READ_TWICE, str(path)], timeout=300)
    assert proc.returncode == 0, proc.stderr
    return [int(v) for v in proc.stdout.split()]


@pytest.mark.parametrize("mechanism", ["cgroup", "balloon"])
def test_a_child_reading_a_file_twice_the_limit_twice_reads_it_from_disk_the_second_time(
        big_file: Path, mechanism: str) -> None:
    if mechanism == "cgroup" and find_cgroup_parent() is None:
        pytest.skip("no writable memory cgroup on this machine")
    with MemoryLimit(LIMIT, mechanism) as limiter:
        assert limiter.mechanism.startswith(mechanism)
        first, second = read_twice(big_file, limiter)
    size = big_file.stat().st_size
    assert first >= 0.9 * size
    assert second >= 0.5 * size, f"only {second / 1e6:.0f} MB of {size / 1e6:.0f} MB came from disk again"


def test_without_a_limit_the_second_read_comes_from_the_page_cache(big_file: Path) -> None:
    with MemoryLimit(None) as limiter:
        first, second = read_twice(big_file, limiter)
    assert first >= 0.9 * big_file.stat().st_size
    assert second <= 0.1 * big_file.stat().st_size
