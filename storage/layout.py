"""The store's on-disk layout: names, format version, block geometry and checksums.

A store is a folder::

    manifest.msgpack        format version, model config, tokenizer, file layouts, checksums, policies
    resident.safetensors    embeddings, attention, norms, LM head (what every token needs)
    ffn/L007.fp16.bin       one file per FFN layer and precision, holding neuron bundles
    predictors.safetensors  one low-rank predictor per layer (after train-predictor)

A bundle file is a sequence of *blocks*. A block holds ``neurons_per_block`` consecutive bundles
and is zero-padded to a multiple of 4 KiB, so every block starts 4 KiB-aligned (O_DIRECT reads
work) and has its own CRC32 in the manifest. A reader verifies every block it uses.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

FORMAT_NAME = "m2cache-store"
FORMAT_VERSION = 1
MANIFEST = "manifest.msgpack"
RESIDENT = "resident.safetensors"
PREDICTORS = "predictors.safetensors"
ALIGN = 4096
TARGET_BLOCK_BYTES = 32 * 1024


def ffn_file_name(layer: int, precision: str) -> str:
    return f"ffn/L{layer:03d}.{precision}.bin"


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
        """Picks neurons per block with the least padding among blocks of about 8–64 KiB."""
        best: tuple[float, int] | None = None
        for npb in range(1, 257):
            raw = npb * bundle_bytes
            if raw > 64 * 1024 and npb > 1:
                break
            waste = (round_up(raw) - raw) / round_up(raw)
            # prefer little padding, then blocks near the target size
            score = waste + abs(raw - TARGET_BLOCK_BYTES) / (8 * TARGET_BLOCK_BYTES)
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


def block_checksums(data: bytes | memoryview, block_bytes: int) -> np.ndarray:
    """CRC32 of each block of ``data`` (whose length is a multiple of block_bytes)."""
    view = memoryview(data)
    n = len(view) // block_bytes
    return np.array([zlib.crc32(view[i * block_bytes:(i + 1) * block_bytes]) for i in range(n)], dtype=np.uint32)


def coalesce(blocks: np.ndarray) -> list[tuple[int, int]]:
    """Sorted unique block ids -> runs (first block, count): one read per contiguous run."""
    if blocks.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(blocks) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [blocks.size]))
    return [(int(blocks[s]), int(e - s)) for s, e in zip(starts, ends)]
