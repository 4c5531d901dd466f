"""The HBM manager's copies up the tiers: each layer's DRAM bundles into the device pool, once per
precision, before its FFN, on the manager's copy thread.

On the CPU a copy is a gather from DRAM into the pool (the C row copy, or torch); on CUDA it runs on its
own copy stream, after what the compute stream was given so far (slots may still be read by earlier
layers), through pinned staging buffers reused from copy to copy (an event per buffer says when its last
copy has left it); the event of the layer's copies is what the compute stream waits on before its FFN.
"""
from __future__ import annotations

import time
from typing import Any

import torch

from m2cache.actors.messages import WeightsReady
from m2cache.model import cpu_kernels


class Uploader:
    """Owned by the HBM manager and used only on its copy thread."""

    def __init__(self, pools: dict[str, torch.Tensor], device: torch.device, recorder,
                 compute_stream: Any, *, kernels: bool) -> None:
        self.pools, self.device, self.recorder = pools, device, recorder
        self.compute_stream = compute_stream
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        # CPU copies into the pool through the C row copy (any policy: it moves bytes, computes nothing)
        self.row_copy = kernels and device.type == "cpu" and cpu_kernels.available()
        self._staging_bufs: dict[str, torch.Tensor] = {}  # host buffers of gathered rows, reused (pinned on CUDA)
        self._staging_done: dict[str, Any] = {}  # per buffer: the event of its last copy
        # CUDA: the event of the last copies made. An answer without copies carries it too: its hits may
        # be slots an abandoned request's copy is still filling
        self.last: Any = None

    def apply(self, ready: WeightsReady, layer: int, step: int, after_compute: bool = True) -> Any:
        """The one batched copy up per precision: pool[slots] = DRAM bundles (CPU: a gather, done on return;
        CUDA: see ``_upload``, on the copy stream; returns the event the compute stream must wait on).

        ``after_compute``: on CUDA the copies wait for what the compute stream was given so far (the
        slots may belong to layers whose kernels still run). A lookahead request needs no wait: its
        slots are never the layer computing's, and every layer before it ended with the host reading
        its ranking back from the device (``Policy.rank``), so their kernels are done."""
        if not ready.copies:
            return None
        t0 = time.perf_counter_ns()
        done = None
        for c in ready.copies:
            pool = self.pools[c.precision]
            if self.copy_stream is None and self.row_copy:  # one pass, DRAM rows straight into the pool
                rows = None if c.rows is None else c.rows.contiguous()
                cpu_kernels.copy_rows(pool, c.dst_slots.contiguous(), c.src.contiguous(), rows)
                continue
            if self.copy_stream is None:
                src = c.src if c.rows is None else self._gather(c)
                wide(pool).index_copy_(0, c.dst_slots, wide(src))
                continue
            assert self.compute_stream is not None
            if after_compute:
                self.copy_stream.wait_stream(self.compute_stream)  # slots may still be read by earlier layers
            with torch.cuda.stream(self.copy_stream):
                dev = self._upload(c)
                wide(pool).index_copy_(0, c.dst_slots.to(self.device, non_blocking=True), wide(dev))
            done = torch.cuda.Event()
            done.record(self.copy_stream)
            self.last = done
        self.recorder.add("hbm", "copy", t0, time.perf_counter_ns(), layer=layer, step=step, nbytes=ready.copy_bytes,
                          flow=step * 1000 + layer)
        return done

    def finish(self) -> None:
        """Waits for every copy made (before the pools may be freed)."""
        if self.copy_stream is not None:
            self.copy_stream.synchronize()

    def _upload(self, c) -> torch.Tensor:
        """Bundles to the device, on the copy stream. A small share of a DRAM layer is gathered on the
        host into a reused pinned staging buffer and sent once; a large share is cheaper sent whole
        from its pinned DRAM copy (55 GB/s) and gathered on the device than gathered by the CPU."""
        src, rows = c.src, c.rows
        if rows is None:
            return src.to(self.device, non_blocking=src.is_pinned())
        if len(rows) * 4 >= src.shape[0] and src.is_pinned():
            return src.to(self.device, non_blocking=True).index_select(0, rows.to(self.device, non_blocking=True))
        dev = self._gather(c).to(self.device, non_blocking=True)
        event = torch.cuda.Event()
        event.record(self.copy_stream)
        self._staging_done[c.precision] = event  # the buffer is free again once this fires
        return dev

    def _gather(self, c) -> torch.Tensor:
        """``c.src[c.rows]`` into this precision's staging buffer, reused from copy to copy (pinned on
        CUDA): a fresh tensor per copy would cost the CPU a page fault per 4 KiB of it, about 3x the
        gather itself (7B shape: 2.4 against 15-20 GB/s)."""
        assert c.rows is not None, "a whole-tensor copy needs no gather"
        buf = self._staging(c.precision, len(c.rows), c.src.shape[0], c.src.shape[1])
        torch.index_select(wide(c.src), 0, c.rows, out=wide(buf))
        return buf

    def _staging(self, precision: str, n: int, layer_rows: int, width: int) -> torch.Tensor:
        done = self._staging_done.get(precision)
        if done is not None:
            done.synchronize()  # the previous copy out of this buffer has finished
        buf = self._staging_bufs.get(precision)
        if buf is None or buf.shape[0] < n:
            # room for a quarter of a layer at once (above that, CUDA sends pinned layers whole), so the
            # buffer is not regrown, and re-pinned, step after step
            buf = torch.empty((max(n, 1024, layer_rows // 4), width), dtype=torch.uint8)
            if self.copy_stream is not None:
                buf = buf.pin_memory()
            self._staging_bufs[precision] = buf
        return buf[:n]



def wide(rows: torch.Tensor) -> torch.Tensor:
    """uint8 rows [n, B] viewed with the widest integer element dividing B: gathers and scatters of
    whole rows then move 8-byte elements (index_copy_ of uint8 rows is ~3x slower on the CPU)."""
    width = rows.shape[-1]
    for dtype, size in ((torch.int64, 8), (torch.int32, 4), (torch.int16, 2)):
        if width % size == 0:
            return rows.view(dtype)
    return rows
