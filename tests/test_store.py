"""The store reader: exact bundles for any id set, coalesced aligned reads, and one typed error per way a
store can be broken (each message names the file and says what to do)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from m2cache.offline.convert import convert
from m2cache.errors import (
    ChecksumError, StoreNotFoundError, StoreVersionError, TransientSSDError, TruncatedStoreError, UnstableReadError,
    UnsupportedArchitectureError,
)
from m2cache.engine.loading import load_resident
from m2cache.formats import quant
from m2cache.storage.bundle_files import BundleFiles
from m2cache.storage.layout import ALIGN, GATE, MANIFEST, RESIDENT, UPDOWN, coalesce, ffn_file_name
from m2cache.storage.reader import CORRUPT_READS, PERSISTENT_READS, SPLIT, WHOLE, PlainBackend, Store, merge_gap
from m2cache.storage.writer import ffn_bundles_of

NEURONS = 1024  # the "wide" store: many 4 KiB blocks per file at every precision (fp16 103, int4 31)


class RecordingBackend(PlainBackend):
    """Plain reads, remembering each (file name, offset, length)."""

    def __init__(self) -> None:
        self.reads: list[tuple[str, int, int]] = []

    def read(self, path: str | Path, offset: int, length: int, into=None) -> bytes:
        self.reads.append((Path(path).name, offset, length))
        return super().read(path, offset, length)


class FlipFirstReads(PlainBackend):
    """Returns a flipped byte in the first ``bad`` reads, then the true bytes (a flaky bus, not a bad file)."""

    def __init__(self, bad: int) -> None:
        self.bad = bad

    def read(self, path: str | Path, offset: int, length: int, into=None) -> bytes:
        data = bytearray(super().read(path, offset, length))
        if self.bad > 0:
            self.bad -= 1
            data[length // 2] ^= 0x40
        return bytes(data)


class FlipEachRead(PlainBackend):
    """A different byte flipped in each of the first ``bad`` reads: wrong bytes that change from read to read."""

    def __init__(self, bad: int) -> None:
        self.bad = bad

    def read(self, path: str | Path, offset: int, length: int, into=None) -> bytes:
        data = bytearray(super().read(path, offset, length))
        if self.bad > 0:
            self.bad -= 1
            data[(length // 2 + 17 * self.bad) % length] ^= 0x40
        return bytes(data)


@pytest.fixture(scope="module")
def wide(make_tiny: Callable[..., Any]) -> Any:
    return make_tiny("wide", seed=7, intermediate_size=NEURONS, num_hidden_layers=2)


@pytest.fixture(scope="module")
def wide_store(wide: Any) -> Store:
    return Store(wide.store)


@pytest.fixture(scope="module")
def wide_bundles(wide: Any) -> list[torch.Tensor]:
    """Each layer's true bundles [F, 3, D] fp32, from the HF folder the store was converted from."""
    from safetensors import safe_open

    with safe_open(str(wide.hf / "model.safetensors"), framework="pt") as f:
        return [ffn_bundles_of(f.get_tensor, layer) for layer in range(2)]


@pytest.fixture
def store_copy(tiny_store: Any, tmp_path: Path) -> Path:
    """A private copy of the tiny store, free to damage."""
    return Path(shutil.copytree(tiny_store.store, tmp_path / "store"))


def rewrite_manifest(store: Path, change: Callable[[dict[str, Any]], None]) -> None:
    path = store / MANIFEST
    manifest = msgpack.unpackb(path.read_bytes(), raw=False, strict_map_key=False)
    change(manifest)
    path.write_bytes(msgpack.packb(manifest, use_bin_type=True))


def assert_names_file_and_fix(err: pytest.ExceptionInfo[Exception], path: Path) -> None:
    msg = str(err.value)
    assert str(path) in msg, msg
    assert "m2cache convert" in msg, msg


# ---- exact bundles --------------------------------------------------------------------------
@pytest.mark.parametrize("precision", quant.PRECISIONS)
def test_read_layer_returns_the_encoded_bundles_of_the_checkpoint(
    wide_store: Store, wide_bundles: list[torch.Tensor], precision: str
) -> None:
    backend = PlainBackend()
    for layer, w in enumerate(wide_bundles):
        want = quant.encode(precision, w, wide_store.groups)
        assert torch.equal(wide_store.read_layer(layer, precision, backend), want)


def test_fp16_bundles_decode_to_the_checkpoint_weights(wide_store: Store, wide_bundles: list[torch.Tensor]) -> None:
    raw = wide_store.read_layer(1, "fp16", PlainBackend())
    assert torch.equal(wide_store.decode("fp16", raw, torch.float32), wide_bundles[1])


@settings(max_examples=40, deadline=None)
@given(data=st.data(), precision=st.sampled_from(quant.PRECISIONS), layer=st.sampled_from([0, 1]))
def test_read_neurons_returns_the_rows_of_the_requested_ids(
    wide_store: Store, data: st.DataObject, precision: str, layer: int
) -> None:
    ids = np.array(data.draw(st.lists(st.integers(0, NEURONS - 1), unique=True, max_size=300)), dtype=np.int64)
    backend = PlainBackend()
    whole = wide_store.read_layer(layer, precision, backend)
    got = wide_store.read_neurons(layer, precision, ids, backend)
    assert got.shape == (ids.size, wide_store.bundle_bytes(precision))
    assert torch.equal(got, whole[torch.from_numpy(ids)])


def test_read_neurons_of_no_ids_reads_nothing(wide_store: Store) -> None:
    backend = RecordingBackend()
    got = wide_store.read_neurons(0, "int8", np.array([], dtype=np.int64), backend)
    assert got.shape == (0, wide_store.bundle_bytes("int8")) and backend.reads == []


def test_read_neurons_refuses_ids_outside_the_layer(wide_store: Store) -> None:
    with pytest.raises(IndexError, match=str(NEURONS)):
        wide_store.read_neurons(0, "fp16", np.array([3, NEURONS]), PlainBackend())


# ---- coalescing -----------------------------------------------------------------------------
def test_coalesce_turns_sorted_blocks_into_runs() -> None:
    assert coalesce(np.array([], dtype=np.int64)) == []
    assert coalesce(np.array([4])) == [(4, 1)]
    assert coalesce(np.array([0, 1, 2, 5, 6, 9])) == [(0, 3), (5, 2), (9, 1)]


def test_coalesce_merges_runs_up_to_max_gap_blocks_apart() -> None:
    blocks = np.array([0, 1, 2, 5, 6, 9, 20])
    assert coalesce(blocks, max_gap=2) == [(0, 10), (20, 1)]
    assert coalesce(blocks, max_gap=1) == [(0, 3), (5, 2), (9, 1), (20, 1)]
    assert coalesce(blocks, max_gap=10) == [(0, 21)]


def expected_reads(files: BundleFiles, precision: str, ids: np.ndarray) -> list[tuple[str, int, int]]:
    """The reader's contract for one kind of bundle file: a request that needs half of a file's blocks or
    more reads the whole file in one read; a smaller one reads each run of needed blocks (runs at most
    merge_gap(geometry) blocks apart merged) once, in file order."""
    geom = files.geometry[precision]
    name = files.file_path(1, precision).name
    blocks = np.unique(ids // geom.neurons_per_block)
    total = geom.num_blocks(files.num_neurons)
    if 2 * len(blocks) >= total:
        return [(name, 0, total * geom.block_bytes)]
    return [(name, first * geom.block_bytes, n * geom.block_bytes) for first, n in coalesce(blocks, merge_gap(geom))]


SPREAD_INT4 = list(range(0, 512, 34))  # 16 ids evenly spread: half the INT4 blocks, so a whole-file read


@settings(max_examples=40, deadline=None)
@given(ids=st.lists(st.integers(0, NEURONS - 1), unique=True, min_size=1, max_size=60),
       precision=st.sampled_from(quant.PRECISIONS), view=st.sampled_from([WHOLE, SPLIT]))
@example(ids=SPREAD_INT4, precision="int4", view=WHOLE)  # half the INT4 blocks: one whole-file read
def test_read_neurons_reads_whole_file_or_each_run_of_blocks_once(
    wide_store: Store, ids: list[int], precision: str, view: str
) -> None:
    # the whole view reads each neuron's gate row from its file and its [up|down] bundle from the other
    store, backend = wide_store.with_view(view), RecordingBackend()
    got = store.read_neurons(1, precision, np.array(ids), backend)
    files = [store.gate_rows, store.bundles] if view == WHOLE else [store.bundles]
    assert backend.reads == [r for f in files for r in expected_reads(f, precision, np.array(ids))]
    assert all(off % ALIGN == 0 and length % ALIGN == 0 for _, off, length in backend.reads)
    assert sum(length for *_, length in backend.reads) == store.run_bytes(precision, np.array(ids))
    assert got.shape == (len(ids), store.bundle_bytes(precision))


@pytest.mark.parametrize("precision", quant.PRECISIONS)
def test_a_request_for_half_the_blocks_reads_the_whole_file_once(wide_store: Store, precision: str) -> None:
    files = wide_store.bundles
    geom = files.geometry[precision]
    total = geom.num_blocks(NEURONS)
    ids = np.arange(0, total, 2)[: (total + 1) // 2] * geom.neurons_per_block  # one id in every other block
    backend = RecordingBackend()
    files.read_neurons(1, precision, ids, backend)
    assert backend.reads == [(files.file_path(1, precision).name, 0, total * geom.block_bytes)]


def test_a_request_for_fewer_than_half_the_blocks_reads_only_their_runs(wide_store: Store) -> None:
    files = wide_store.bundles
    geom = files.geometry["int4"]
    total = geom.num_blocks(NEURONS)
    ids = np.array([0, (total - 1) * geom.neurons_per_block])  # the first and the last block
    backend = RecordingBackend()
    files.read_neurons(1, "int4", ids, backend)
    assert [(off, n) for _, off, n in backend.reads] == [
        (0, geom.block_bytes), ((total - 1) * geom.block_bytes, geom.block_bytes)]


def test_neighbouring_blocks_are_read_in_one_request(wide_store: Store) -> None:
    files = wide_store.bundles
    geom = files.geometry["fp16"]
    npb = geom.neurons_per_block
    far = 3 + merge_gap(geom) + 1  # a block past the gap that reads merge over
    ids = np.array([0, npb, 2 * npb + 1, far * npb])  # blocks 0, 1, 2 and `far`
    backend = RecordingBackend()
    files.read_neurons(0, "fp16", ids, backend)
    assert [(off, length) for _, off, length in backend.reads] == [
        (0, 3 * geom.block_bytes), (far * geom.block_bytes, geom.block_bytes)]


def test_blocks_a_small_gap_apart_are_read_in_one_request(wide_store: Store) -> None:
    files = wide_store.bundles
    geom = files.geometry["fp16"]
    gap = merge_gap(geom)
    ids = np.array([0, (gap + 1) * geom.neurons_per_block])  # blocks 0 and gap+1: the gap is read too
    backend = RecordingBackend()
    files.read_neurons(0, "fp16", ids, backend)
    assert [(off, length) for _, off, length in backend.reads] == [(0, (gap + 2) * geom.block_bytes)]


def test_the_split_view_reads_up_and_down_only_and_the_whole_view_joins_the_gate_rows(wide_store: Store) -> None:
    split = wide_store.with_view(SPLIT)
    ids = np.array([5, 300, 301, 900])
    for p in quant.PRECISIONS:
        whole = wide_store.read_neurons(1, p, ids, PlainBackend())
        up_down = split.read_neurons(1, p, ids, PlainBackend())
        assert torch.equal(up_down, quant.select_parts(p, whole, 3, wide_store.hidden, wide_store.groups, 1, 3))
        assert split.bundle_bytes(p) * 3 == wide_store.bundle_bytes(p) * 2  # two parts of three fetched
        assert torch.equal(split.read_layer(1, p, PlainBackend())[torch.from_numpy(ids)], up_down)


# ---- checksums ------------------------------------------------------------------------------
def test_a_flipped_byte_in_a_bundle_file_raises_checksum_error_on_read(store_copy: Path) -> None:
    path = store_copy / ffn_file_name(1, "int8", GATE)
    data = bytearray(path.read_bytes())
    data[100] ^= 0x01
    path.write_bytes(bytes(data))
    store = Store(store_copy)  # opening checks sizes, not contents
    with pytest.raises(ChecksumError) as err:
        store.read_neurons(1, "int8", np.array([0, 5]), PlainBackend())
    assert_names_file_and_fix(err, path)


def test_a_flipped_byte_fails_only_reads_of_its_block(wide: Any, tmp_path: Path) -> None:
    root = Path(shutil.copytree(wide.store, tmp_path / "store"))
    store = Store(root)
    geom = store.geometry["fp16"]  # the [up|down] files'
    path = root / ffn_file_name(0, "fp16", UPDOWN)
    data = bytearray(path.read_bytes())
    data[3 * geom.block_bytes + 10] ^= 0xFF  # inside block 3
    path.write_bytes(bytes(data))
    backend = PlainBackend()
    # blocks 0, 2 and 4 come in one request spanning the corrupt block 3, which is not used: no error
    store.read_neurons(0, "fp16", np.array([0, 2 * geom.neurons_per_block, 4 * geom.neurons_per_block]), backend)
    with pytest.raises(ChecksumError):
        store.read_neurons(0, "fp16", np.array([3 * geom.neurons_per_block]), backend)


def test_a_corrupt_read_is_read_again_until_it_reads_right(wide_store: Store) -> None:
    ids = np.arange(0, NEURONS, 3)
    want = wide_store.read_neurons(0, "int4", ids, PlainBackend())
    assert torch.equal(wide_store.read_neurons(0, "int4", ids, FlipFirstReads(bad=1)), want)
    # a flaky read may give wrong bytes several times, even the same ones twice: still the file is intact
    assert torch.equal(wide_store.read_neurons(0, "int4", ids, FlipFirstReads(bad=PERSISTENT_READS - 1)), want)
    assert torch.equal(wide_store.read_neurons(0, "int4", ids, FlipEachRead(bad=CORRUPT_READS - 1)), want)


def test_the_same_wrong_bytes_on_every_read_raise_checksum_error_after_a_few_reads(store_copy: Path) -> None:
    path = store_copy / ffn_file_name(1, "int8", UPDOWN)
    data = bytearray(path.read_bytes())
    data[100] ^= 0x01
    path.write_bytes(bytes(data))
    backend = RecordingBackend()
    with pytest.raises(ChecksumError) as err:
        Store(store_copy).read_neurons(1, "int8", np.array([0]), backend)
    assert_names_file_and_fix(err, path)
    # the gate rows' file reads right once; the [up|down] one the same wrong bytes PERSISTENT_READS times
    assert "same bytes" in str(err.value) and len(backend.reads) == 1 + PERSISTENT_READS


def test_wrong_bytes_that_change_from_read_to_read_raise_an_unstable_read_error_that_does_not_blame_the_file(
        wide_store: Store) -> None:
    backend = FlipEachRead(bad=CORRUPT_READS)
    with pytest.raises(UnstableReadError) as err:
        wide_store.read_neurons(0, "int4", np.array([1]), backend)
    msg = str(err.value)
    assert str(wide_store.gate_rows.file_path(0, "int4")) in msg and "likely intact" in msg and "m2cache convert" not in msg
    assert backend.bad == 0  # read CORRUPT_READS times, then given up
    assert isinstance(err.value, TransientSSDError)


def test_a_corrupt_resident_file_raises_checksum_error_at_load(store_copy: Path) -> None:
    path = store_copy / RESIDENT
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x10  # tensor data, so safetensors itself would not notice
    path.write_bytes(bytes(data))
    with pytest.raises(ChecksumError) as err:
        load_resident(Store(store_copy), torch.float32)
    assert_names_file_and_fix(err, path)


# ---- bad stores, refused at open --------------------------------------------------------------
@pytest.mark.parametrize("name", [ffn_file_name(2, "fp16", UPDOWN), ffn_file_name(0, "int4", GATE), RESIDENT])
def test_a_truncated_file_raises_truncated_store_error_at_open(store_copy: Path, name: str) -> None:
    path = store_copy / name
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 1)
    with pytest.raises(TruncatedStoreError) as err:
        Store(store_copy)
    assert_names_file_and_fix(err, path)


def test_a_missing_manifest_raises_store_not_found(store_copy: Path) -> None:
    (store_copy / MANIFEST).unlink()
    with pytest.raises(StoreNotFoundError) as err:
        Store(store_copy)
    assert_names_file_and_fix(err, store_copy / MANIFEST)


def test_a_missing_folder_raises_store_not_found(tmp_path: Path) -> None:
    with pytest.raises(StoreNotFoundError) as err:
        Store(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(err.value) and "m2cache convert" in str(err.value)


def test_a_store_path_that_is_a_file_is_named_as_a_file(tiny_store: Any, tmp_path: Path) -> None:
    with pytest.raises(StoreNotFoundError, match="is a file, not a store folder") as err:
        Store(tiny_store.store / MANIFEST)
    assert str(tiny_store.store) in str(err.value)  # the folder to give instead
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(StoreNotFoundError, match="m2cache convert"):
        Store(gguf)


def test_a_damaged_store_fails_its_verification_naming_the_file_and_the_way_to_rewrite_it(
        store_copy: Path) -> None:
    from m2cache.errors import StoreError
    from m2cache.offline.convert import _verify

    Store(store_copy).verify()
    path = store_copy / ffn_file_name(2, "fp16", UPDOWN)
    data = bytearray(path.read_bytes())
    data[7] ^= 0x20
    path.write_bytes(bytes(data))
    with pytest.raises(ChecksumError) as err:
        Store(store_copy).verify()
    assert str(path) in str(err.value)
    with pytest.raises(StoreError, match="m2cache fetch --force"):
        _verify(store_copy)


def test_an_unknown_format_version_raises_store_version_error(store_copy: Path) -> None:
    rewrite_manifest(store_copy, lambda m: m.update(version=99))
    with pytest.raises(StoreVersionError) as err:
        Store(store_copy)
    assert_names_file_and_fix(err, store_copy / MANIFEST)
    assert "99" in str(err.value)


def test_an_unknown_checksum_algorithm_raises_store_version_error(store_copy: Path) -> None:
    rewrite_manifest(store_copy, lambda m: m.update(checksum="sha3"))
    with pytest.raises(StoreVersionError) as err:
        Store(store_copy)
    assert_names_file_and_fix(err, store_copy / MANIFEST)


def test_a_store_of_another_architecture_raises_unsupported_architecture(store_copy: Path) -> None:
    rewrite_manifest(store_copy, lambda m: m["config"].update(model_type="gpt2"))
    with pytest.raises(UnsupportedArchitectureError) as err:
        Store(store_copy)
    assert str(store_copy / MANIFEST) in str(err.value) and "gpt2" in str(err.value)
    assert "llama" in str(err.value)  # says what it does run


def test_converting_a_checkpoint_of_another_architecture_raises_unsupported_architecture(
    tiny_store: Any, tmp_path: Path
) -> None:
    hf = Path(shutil.copytree(tiny_store.hf, tmp_path / "hf"))
    cfg = json.loads((hf / "config.json").read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (hf / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitectureError) as err:
        convert(hf, tmp_path / "store", progress=False)
    assert str(hf / "config.json") in str(err.value) and "gpt2" in str(err.value)
    assert "llama" in str(err.value)
    assert not (tmp_path / "store").exists()


def test_verify_names_a_damaged_int8_attention_file(store_copy: Path) -> None:
    """`m2cache fetch` verifies a store it has: a flipped byte in the INT8 attention file is a ChecksumError
    naming the file and the layer, with the fix."""
    store = Store(store_copy)
    entry = store.manifest.get("attention_int8")
    if not entry:
        pytest.skip("this store keeps no INT8 attention file")
    path = store_copy / entry["path"]
    data = bytearray(path.read_bytes())
    data[entry["layer_bytes"] + 7] ^= 0x10  # inside layer 1's region
    path.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="layer 1's INT8 attention") as err:
        Store(store_copy).verify()
    assert str(path) in str(err.value) and "m2cache" in str(err.value)
