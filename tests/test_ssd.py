"""FileBackend and SimulatedSSD: exact reads, typed errors, the spec parser, deterministic faults.

No test asserts wall time; the simulated clock (``simulated_seconds``) is checked instead.
"""
from __future__ import annotations

import os
from dataclasses import replace
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from m2cache.errors import ConfigError, PermanentSSDError, SSDError, TransientSSDError
from m2cache.storage.ssd import FileBackend
from m2cache.storage.ssd_sim import SimulatedSSD, SSDSimSpec

DATA = os.urandom(3 * 4096 + 123)


@pytest.fixture
def blob(tmp_path: Path) -> Path:
    path = tmp_path / "ffn_L003_fp16.bin"
    path.write_bytes(DATA)
    return path


@pytest.fixture
def files(tmp_path: Path) -> list[Path]:
    paths = []
    for layer in range(4):
        path = tmp_path / f"ffn_L{layer:03d}_fp16.bin"
        path.write_bytes(os.urandom(8192))
        paths.append(path)
    return paths


@pytest.mark.parametrize("direct", [False, True])
def test_file_backend_reads_exact_bytes(blob: Path, direct: bool) -> None:
    backend = FileBackend(direct=direct)
    try:
        for offset, length in [(0, 10), (4095, 2), (5000, 4096), (0, len(DATA)), (len(DATA) - 1, 1), (7, 0)]:
            assert backend.read(blob, offset, length) == DATA[offset:offset + length]
        assert backend.stats()["reads"] == 5
        assert backend.bytes_read == 10 + 2 + 4096 + len(DATA) + 1
    finally:
        backend.close()


@pytest.mark.parametrize("direct", [False, True])
def test_file_backend_short_read_is_permanent_and_names_the_range(blob: Path, direct: bool) -> None:
    backend = FileBackend(direct=direct)
    with pytest.raises(PermanentSSDError, match=rf"{blob.name} at offset {len(DATA) - 4}, length 8"):
        backend.read(blob, len(DATA) - 4, 8)
    backend.close()


def test_file_backend_missing_file_is_permanent(tmp_path: Path) -> None:
    with pytest.raises(PermanentSSDError, match="nope.bin"):
        FileBackend().read(tmp_path / "nope.bin", 0, 1)


def test_evict_page_cache_runs_and_reads_still_work(blob: Path) -> None:
    backend = FileBackend()
    backend.evict_page_cache([blob])
    assert backend.read(blob, 100, 50) == DATA[100:150]
    backend.close()


# ------------------------------------------------------------------ spec parsing

def test_parse_accepts_every_key_and_unit() -> None:
    spec = SimulatedSSD.parse(
        "latency=200us, bandwidth=1.5GB/s, jitter=0.5, seed=7, fail=0.01, fail_after=9, "
        "fail_permanent=1, fail_path=*L003*, corrupt=0.001, stall=200ms@0.01")
    assert spec.latency == pytest.approx(200e-6)
    assert replace(spec, latency=0.0) == SSDSimSpec(bandwidth=1.5e9, jitter=0.5, seed=7, fail=0.01,
                              fail_after=9, fail_permanent=True, fail_path="*L003*", corrupt=0.001,
                              stall=0.2, stall_p=0.01)
    assert SimulatedSSD.parse("latency=0.005s,bandwidth=2MiB/s").bandwidth == 2 * 2**20
    assert SimulatedSSD.parse("latency=5ms").latency == pytest.approx(0.005)
    assert SimulatedSSD.parse("") == SSDSimSpec()


@pytest.mark.parametrize("spec, needle", [
    ("latncy=5ms", "unknown key 'latncy'"),
    ("latency=5", "duration with a unit"),
    ("bandwidth=fast", "rate like 200MB/s"),
    ("bandwidth=0MB/s", "positive rate"),
    ("fail=2", r"\[0, 1\]"),
    ("stall=200ms", "DELAY@PROBABILITY"),
    ("seed=x", "integer"),
    ("latency", "key=value"),
    ("seed=1,seed=2", "twice"),
])
def test_parse_errors_are_config_errors_listing_valid_keys(spec: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle) as info:
        SimulatedSSD.parse(spec)
    if "twice" not in needle:
        assert "valid keys" in str(info.value) or "bandwidth=200MB/s" in str(info.value)


# ------------------------------------------------------------------ simulated faults

def outcomes(ssd: SimulatedSSD, files: list[Path], reference: dict[Path, bytes]) -> dict[tuple[str, int, int], str]:
    """Read every 512-byte block twice (attempts 0 and 1) from 4 threads; record what happened."""
    jobs = [(path, offset, attempt) for attempt in range(2) for path in files for offset in range(0, 8192, 512)]

    def one(job: tuple[Path, int, int]) -> tuple[tuple[str, int, int], str]:
        path, offset, attempt = job
        try:
            data = ssd.read(path, offset, 512)
        except SSDError as exc:
            return (path.name, offset, attempt), type(exc).__name__
        return (path.name, offset, attempt), "ok" if data == reference[path][offset:offset + 512] else "corrupt"

    # attempt 1 of a block must follow its attempt 0: run the two rounds one after the other
    with ThreadPoolExecutor(4) as pool:
        first = dict(pool.map(one, [j for j in jobs if j[2] == 0]))
        second = dict(pool.map(one, [j for j in jobs if j[2] == 1]))
    return first | second


def test_faults_are_deterministic_for_a_seed_across_threaded_runs(files: list[Path]) -> None:
    reference = {p: p.read_bytes() for p in files}
    spec = "seed=3,fail=0.2,corrupt=0.2"
    a = outcomes(SimulatedSSD(FileBackend(), spec), files, reference)
    b = outcomes(SimulatedSSD(FileBackend(), spec), files, reference)
    assert a == b
    kinds = set(a.values())
    assert {"ok", "corrupt", "TransientSSDError"} <= kinds
    c = outcomes(SimulatedSSD(FileBackend(), "seed=4,fail=0.2,corrupt=0.2"), files, reference)
    assert c != a


def test_transient_failures_may_succeed_on_retry_but_permanent_ones_never(files: list[Path]) -> None:
    reference = {p: p.read_bytes() for p in files}
    transient = outcomes(SimulatedSSD(FileBackend(), "seed=1,fail=0.5"), files, reference)
    retried_ok = [k for k, v in transient.items() if k[2] == 1 and v == "ok"
                  and transient[(k[0], k[1], 0)] == "TransientSSDError"]
    assert retried_ok
    permanent = outcomes(SimulatedSSD(FileBackend(), "seed=1,fail=0.5,fail_permanent=1"), files, reference)
    for (name, offset, attempt), what in permanent.items():
        assert what in ("ok", "PermanentSSDError")
        assert what == permanent[(name, offset, 1 - attempt)]


def test_corrupt_flips_exactly_one_byte(blob: Path) -> None:
    ssd = SimulatedSSD(FileBackend(), "seed=2,corrupt=1")
    for offset in range(0, 8192, 1024):
        data = ssd.read(blob, offset, 1024)
        diff = [i for i, (x, y) in enumerate(zip(data, DATA[offset:offset + 1024])) if x != y]
        assert len(diff) == 1 and len(data) == 1024
    assert ssd.stats()["corruptions"] == 8


def test_fail_after_fails_every_later_read_permanently(blob: Path) -> None:
    ssd = SimulatedSSD(FileBackend(), "fail_after=3")
    for i in range(3):
        assert ssd.read(blob, i, 4) == DATA[i:i + 4]
    for i in range(3):
        with pytest.raises(PermanentSSDError, match=rf"{blob.name} at offset {i}, length 4"):
            ssd.read(blob, i, 4)
    assert ssd.stats()["permanent_failures"] == 3


def test_fail_path_limits_faults_to_matching_files(files: list[Path]) -> None:
    ssd = SimulatedSSD(FileBackend(), "fail=1,fail_path=*L003*")
    for path in files[:3]:
        assert ssd.read(path, 0, 16) == path.read_bytes()[:16]
    with pytest.raises(TransientSSDError, match="ffn_L003_fp16.bin at offset 0, length 16"):
        ssd.read(files[3], 0, 16)
    assert ssd.stats()["failures"] == 1


def test_latency_bandwidth_and_stalls_charge_the_simulated_clock(blob: Path) -> None:
    ssd = SimulatedSSD(FileBackend(), "latency=2ms,bandwidth=1MB/s")
    for _ in range(3):
        ssd.read(blob, 0, 1000)  # 2 ms latency + 1 ms transfer each
    assert ssd.simulated_seconds == pytest.approx(3 * 0.003)
    jittery = SimulatedSSD(FileBackend(), "latency=1ms,jitter=0.5,seed=5")
    jittery.read(blob, 0, 10)
    assert 0.001 <= jittery.simulated_seconds < 0.0015
    stalling = SimulatedSSD(FileBackend(), "stall=5ms@1")
    stalling.read(blob, 0, 10)
    assert stalling.stats()["stalls"] == 1
    assert stalling.simulated_seconds == pytest.approx(0.005)
    assert SimulatedSSD(FileBackend()).read(blob, 1, 3) == DATA[1:4]


def test_concurrent_transfers_share_the_bandwidth(blob: Path) -> None:
    ssd = SimulatedSSD(FileBackend(), "bandwidth=5MB/s")
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: ssd.read(blob, i * 1000, 5000), range(4)))
    assert results == [DATA[i * 1000:i * 1000 + 5000] for i in range(4)]
    # four 1 ms transfers go through one busy-until clock: it ends >= 4 ms after the first started
    assert ssd.simulated_seconds == pytest.approx(0.004)
    assert ssd._busy_until > 0
