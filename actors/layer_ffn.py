"""The FFN of one layer, computed on the executor's compute thread from the rows the HBM manager made ready.

Its reasons to change are the FFN's own (bundle layouts, kernels, precisions), not the executor's
scheduling. The rows sit in the device pool at ``ready.slots``, or, on the CPU computing from DRAM
(``HBMManager._direct``), in DRAM tensors at ``ready.direct``'s rows (None: the tensor holds exactly the
requested bundles). Decode steps on the CPU run the C kernels straight over those rows (no gather, no
dequantised copy), and so do a prefill split by the policy and a dense prefill of up to
``cpu_kernels.MAX_TOKENS`` positions (one call reads the layer's FP16 rows once for all of them: on the 7B
shape a short prompt's FFN costs its bytes instead of torch's bfloat16 products over a dequantised layer);
a longer dense prefill, CUDA and the exact ``dense-fp16`` policy gather the rows and use torch (the FP16
torch path is the dense model's own code, bit for bit).

A split store's bundles hold up and down only: the gate policy's activations for the layer's rows, the
ones that ranked its neurons (``score``), are kept until its FFN takes the kept neurons' share of them.
"""
from __future__ import annotations

import torch

from m2cache.actors.messages import WeightsReady
from m2cache.actors.rows import row_view
from m2cache.actors.uploads import wide
from m2cache.model import cpu_kernels
from m2cache.model.sparse_ffn import ffn_groups


class LayerFFN:
    def __init__(self, *, store, policy, pools: dict[str, torch.Tensor], act, dtype: torch.dtype, use_kernels: bool,
                 dense_prefill: bool) -> None:
        self.parts, self.dim, self.groups, self.split = store.parts, store.hidden, store.groups, store.split
        self.act_name = store.config.hidden_act
        self.policy, self.pools, self.act, self.dtype = policy, pools, act, dtype
        self.use_kernels, self.dense_prefill = use_kernels, dense_prefill
        self._acts: tuple[int, torch.Tensor] | None = None  # (layer, gate activations) scored for its FFN

    def forget(self) -> None:
        """A new step: a step that failed mid-layer leaves no gate activations behind for this one's rows."""
        self._acts = None

    def score(self, layer: int, hs: list[torch.Tensor], keep: bool = True) -> torch.Tensor:
        """One score per neuron for the rows ``hs`` (each [1, D] or a sequence's last position); on a split
        store the gate activations that give it are kept for the layer's FFN (the same rows), unless
        ``keep`` is False: a lookahead's rows are not the layer's own FFN input."""
        if not self.split:
            return self.policy.score_batch(layer, hs)
        acts = self.policy.gate_acts(layer, torch.cat(hs))
        if keep:
            self._acts = (layer, acts)
        return self.policy.scores_of(layer, acts).amax(0)

    def score_rows(self, layer: int, hs: list[torch.Tensor], keep: bool = True) -> list[torch.Tensor]:
        """``score`` for each sequence alone (``hs[i]``: its rows, every one scored, the largest kept): the
        batch-invariant ranking (``m2cache.actors.rows``); a split store keeps every row's gate activations."""
        if not self.split:
            return self.policy.score_rows(layer, hs)
        # each sequence's rows alone: the call (kernel for a row or two, one product for more) is the one it
        # would get alone, whatever it is batched with
        acts = torch.cat([self.policy.gate_acts(layer, h) for h in hs])
        if keep:
            self._acts = (layer, acts)
        scores = self.policy.scores_of(layer, acts)
        return [s.amax(0) for s in scores.split([h.shape[0] for h in hs])]

    def each_row(self, hs: list[torch.Tensor], ready: WeightsReady, prefill: bool) -> list[torch.Tensor]:
        """Each sequence's FFN over its own cut (``ready.rows``; all of ``ready`` when None), through the call
        it would make alone: the batch-invariant step."""
        acts, self._acts = self._acts, None
        outs, start = [], 0
        for i, h in enumerate(hs):
            mine = ready if ready.rows is None else row_view(ready, ready.rows[i])
            if acts is not None and acts[0] == ready.layer:
                self._acts = (ready.layer, acts[1][start:start + h.shape[0]])  # this row's, as scored alone
            outs.append(self.compute(h, mine, prefill))
            start += h.shape[0]
        return outs

    def compute(self, h: torch.Tensor, ready: WeightsReady, prefill: bool) -> torch.Tensor:
        """The layer's FFN. h: [T, D] -> [T, D]."""
        gacts = self._gate_acts(h, ready) if self.split else None
        # a prefill split by the policy runs the kernels too: no layer dequantised
        if self.kernels_for(h.shape[0], prefill):
            out = cpu_kernels.ffn_sources(self._sources(ready), h.float().contiguous(), self.dim, self.groups,
                                          self.act_name, gacts)
            return out.to(self.dtype)
        return ffn_groups(h, self.raw_rows(ready), self.parts, self.dim, self.groups, self.act, self.dtype,
                          gacts=gacts)

    def kernels_for(self, rows: int, prefill: bool) -> bool:
        """Whether the FFN of ``rows`` positions runs through the C kernels (see the module's docstring)."""
        return self.use_kernels and not (prefill and self.dense_prefill and rows > cpu_kernels.MAX_TOKENS)

    def each(self, hs: list[torch.Tensor], ready: WeightsReady) -> list[torch.Tensor]:
        """The exact policy's FFN for a batch: the rows gathered once, each sequence's product alone."""
        raw = self.raw_rows(ready)
        return [ffn_groups(h, raw, self.parts, self.dim, self.groups, self.act, self.dtype) for h in hs]

    def raw_rows(self, ready: WeightsReady) -> dict[str, torch.Tensor]:
        """The layer's bundles per precision as one uint8 tensor each (gathered where they are spread)."""
        sources = self._sources(ready)
        # DRAM rows are ascending neuron ids: a whole layer asked for whole is used as it is
        whole = ready.direct is not None
        return {p: src if rows is None or whole and _all_rows(rows, src)
                else wide(src).index_select(0, rows.to(src.device)).view(torch.uint8)
                for p, (src, rows) in sources.items() if rows is None or len(rows)}

    def _sources(self, ready: WeightsReady) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """Per precision: the tensor holding the layer's bundles (DRAM's, or the device pool) and their rows."""
        if ready.direct is not None:
            return ready.direct
        return {p: (self.pools[p], slots) for p, slots in ready.slots.items()}

    def _gate_acts(self, h: torch.Tensor, ready: WeightsReady) -> dict[str, torch.Tensor]:
        """A split store's gate activations of the layer's rows, per precision [n_p, T] float32 in the rows'
        order: every neuron's (those ``score`` kept, or computed now for a dense prefill), taken by id."""
        assert ready.ids is not None, "a split store's layer needs its neuron ids"
        cached, self._acts = self._acts, None
        if cached is not None and cached[0] == ready.layer and cached[1].shape[0] == h.shape[0]:
            full = cached[1].float()
        else:
            full = self.policy.gate_acts(ready.layer, h).float()
        # one gather a precision, straight into the [n_p, T] layout the kernels read (index_select copies)
        return {p: full.T.index_select(0, torch.from_numpy(ids).to(full.device)) for p, ids in ready.ids.items()}


def _all_rows(rows: torch.Tensor, src: torch.Tensor) -> bool:
    """Ascending unique rows that cover all of src."""
    n = src.shape[0]
    return len(rows) == n and int(rows[0]) == 0 and int(rows[-1]) == n - 1


def kernels_apply(policy, store, cfg, device: torch.device) -> bool:
    """Whether decode FFNs run through the C kernels: the CPU, a gated FFN with a supported activation,
    the kernels built, and a policy other than the exact every-neuron-FP16 one (whose tokens must equal
    the dense model's, so it keeps torch's code)."""
    return (device.type == "cpu" and not policy.exact and (store.parts == 3 or store.split)
            and cfg.hidden_act in cpu_kernels.ACTIVATIONS and cpu_kernels.available())
