"""The store's on-disk layout: names, format version, block geometry and checksums.

A store is a folder (format version 3)::

    manifest.msgpack         format version, model config, tokenizer, file layouts, checksums, policies
    resident.safetensors     embeddings, attention, norms, LM head (what every token needs)
    attention-int8.bin       every layer's attention projections in INT8 (what ``--resident stream`` reads)
    ffn/L007.fp16.updown.bin one file per FFN layer and precision: each neuron's up row and down column
    ffn/L007.fp16.gate.bin   one file per FFN layer and precision: each neuron's gate row
    gate-norms.safetensors   ||up_j||·||down_j|| per layer (what a gate policy weighs its gate by)
    predictors.safetensors   one low-rank predictor per layer (after train-predictor)

A gate policy keeps every layer's INT4 gate rows resident and fetches the up/down files only; every other
policy fetches a neuron's gate row beside its up and down ones (two reads where stores of version 2 and
before, one bundle of gate, up and down per neuron in ``ffn/L007.fp16.bin``, needed one).

A bundle file is a sequence of *blocks*. A block holds ``neurons_per_block`` consecutive bundles
and is zero-padded to a multiple of 4 KiB, so every block starts 4 KiB-aligned (O_DIRECT reads
work) and has its own CRC32 in the manifest. A reader verifies every block it uses.
"""
from __future__ import annotations

import zlib

import crc32c
from dataclasses import dataclass

import numpy as np

FORMAT_NAME = "m2cache-store"
# 3: the gate rows in files of their own beside [up|down] bundles, so one store runs every policy;
# 2: INT8 in groups along D (manifest ``ffn.int8_group``); 1: one INT8 scale per row
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
MANIFEST = "manifest.msgpack"
RESIDENT = "resident.safetensors"
PREDICTORS = "predictors.safetensors"
GATE_NORMS = "gate-norms.safetensors"
UPDOWN, GATE = "updown", "gate"  # the two kinds of bundle file of a version 3 store
ALIGN = 4096
AMPLIFICATION_COST = 0.1  # per extra 4 KiB page a neuron-level read must bring along


def ffn_file_name(layer: int, precision: str, kind: str = "") -> str:
    """A bundle file's path in the store: ``kind`` UPDOWN or GATE (version 3), or "" for the bundles of gate,
    up and down together (versions 1 and 2)."""
    return f"ffn/L{layer:03d}.{precision}{'.' + kind if kind else ''}.bin"


def round_up(n: int, to: int = ALIGN) -> int:
    return (n + to - 1) // to * to


@dataclass(frozen=True, slots=True)
class BlockGeometry:
    """How one precision's bundles are laid out in blocks."""

    bundle_bytes: int
    neurons_per_block: int
    block_bytes: int  # padded, a multiple of ALIGN

    @classmethod
    def choose(cls, bundle_bytes: int) -> "BlockGeometry":
        """Picks neurons per block trading padding against read amplification.

        Whole-layer reads pay for padding; neuron-level reads pay for the pages of a block beyond
        the ones its bundle needs (a random 10% of neurons with 13 per block touches ~75% of the
        blocks). So the score is padding share + AMPLIFICATION_COST per extra 4 KiB page.
        """
        bundle_pages = round_up(bundle_bytes) // ALIGN
        best: tuple[float, int] | None = None
        for npb in range(1, 257):
            raw = npb * bundle_bytes
            if raw > 64 * 1024 and npb > 1:
                break
            waste = (round_up(raw) - raw) / round_up(raw)
            score = waste + AMPLIFICATION_COST * (round_up(raw) // ALIGN - bundle_pages)
            if best is None or score < best[0]:
                best = (score, npb)
        assert best is not None
        npb = best[1]
        return cls(bundle_bytes, npb, round_up(npb * bundle_bytes))

    def num_blocks(self, num_neurons: int) -> int:
        return (num_neurons + self.neurons_per_block - 1) // self.neurons_per_block

    def file_bytes(self, num_neurons: int) -> int:
        return self.num_blocks(num_neurons) * self.block_bytes

    def to_dict(self) -> dict[str, int]:
        return {"bundle_bytes": self.bundle_bytes, "neurons_per_block": self.neurons_per_block,
                "block_bytes": self.block_bytes}


# CRC32C (Castagnoli) runs in hardware on x86-64 and Arm (~15 GB/s here, against ~1 GB/s for
# zlib's CRC32), which matters because every block is verified on every read. Stores written
# before the manifest named its algorithm used zlib's CRC32; both are read.
CHECKSUM = "crc32c"
_CHECKSUMS = {"crc32c": crc32c.crc32c, "crc32": zlib.crc32}


def checksum_fn(name: str):
    if name not in _CHECKSUMS:
        raise ValueError(f"unknown checksum {name!r}; known: {', '.join(_CHECKSUMS)}")
    return _CHECKSUMS[name]


def block_checksums(data: bytes | memoryview, block_bytes: int, algorithm: str = CHECKSUM) -> np.ndarray:
    """Checksum of each block of ``data`` (whose length is a multiple of block_bytes)."""
    fn = checksum_fn(algorithm)
    view = memoryview(data)
    n = len(view) // block_bytes
    return np.array([fn(view[i * block_bytes:(i + 1) * block_bytes]) for i in range(n)], dtype=np.uint32)


def file_checksum(path, algorithm: str = CHECKSUM) -> int:
    fn = checksum_fn(algorithm)
    value = 0
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            value = fn(chunk, value)
    return value


def coalesce(blocks: np.ndarray, max_gap: int = 0) -> list[tuple[int, int]]:
    """Sorted unique block ids -> runs (first block, count) covering them: one read per run.
    Blocks at most ``max_gap`` blocks apart share a run (the gap is read too)."""
    if blocks.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(blocks) > max_gap + 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [blocks.size]))
    return [(int(blocks[s]), int(blocks[e - 1] - blocks[s] + 1)) for s, e in zip(starts, ends)]
