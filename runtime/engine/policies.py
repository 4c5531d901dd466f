"""Policy lookup by name: built-in ones and those stored in a store's manifest."""
from __future__ import annotations

import torch

from m2cache.errors import ConfigError
from m2cache.model import cpu_kernels
from m2cache.model.llama import activation
from m2cache.formats.shares import Shares
from m2cache.model.policy import GatePolicy, OraclePolicy, Policy
from m2cache.formats import quant
from m2cache.model.predictor import PredictorPolicy, shares_from_spec
from m2cache.storage.reader import SPLIT, WHOLE, PlainBackend, Store

BUILTIN = ("dense-fp16", "oracle", "oracle:A,B,C", "predictor:A,B,C", "gate:A,B,C")


def parse_shares(name: str) -> Shares:
    """``KIND`` (every neuron) or ``KIND:0.1,0.2,0.2`` (FP16, INT8, INT4 shares), KIND oracle or predictor."""
    if ":" not in name:
        return Shares()
    kind, spec = name.split(":", 1)
    try:
        fp16, int8, int4 = (float(v) for v in spec.split(","))
    except ValueError as e:
        raise ConfigError(f"{kind} shares: write {kind}:FP16,INT8,INT4, e.g. {kind}:0.1,0.2,0.2 ({e})") from e
    return Shares(fp16, int8, int4)


def parse_oracle(name: str) -> Shares:
    """``oracle`` (every neuron) or ``oracle:0.1,0.2,0.2`` (FP16, INT8, INT4 shares)."""
    return parse_shares(name)


def list_policies(store: Store) -> dict[str, dict]:
    out = {"dense-fp16": {"shares": Shares().to_dict(), "builtin": True}}
    for name, spec in (store.manifest.get("policies") or {}).items():
        out[name] = dict(spec)
    return out


def default_policy_name(store: Store) -> str:
    return store.manifest.get("default_policy") or "dense-fp16"


def store_for_policy(store: Store, name: str | None) -> Store:
    """The view of ``store`` that policy ``name`` (None: the default) fetches: a gate policy's bundles of up
    and down only where the store keeps its gate rows apart (format version 3, or a version 2 split store),
    every other policy's bundles of gate, up and down."""
    name = name or default_policy_name(store)
    if is_gate_policy(store, name):
        return store.with_view(SPLIT) if SPLIT in store.views else store
    return store.with_view(WHOLE, what=repr(name))


def load_policy(store: Store, name: str | None, dtype: torch.dtype, device: str | torch.device = "cpu",
                kernels: bool = True) -> Policy:
    """The policy ``name`` (None: the store's default) over ``store`` in the view it fetches (see
    ``store_for_policy``); ``kernels`` False keeps a gate policy off the C kernels (the engine's
    ``cpu_kernels``)."""
    name = name or default_policy_name(store)
    cfg = store.config
    stored = store.manifest.get("policies") or {}
    if store.split and not is_gate_policy(store, name):
        store = store.with_view(WHOLE, what=repr(name))  # refused, saying what to do, where there is none
    if name == "dense-fp16":
        return Policy(cfg.num_layers, cfg.intermediate_size)
    if name.startswith("oracle"):
        backend = PlainBackend()
        weights = [store.decode("fp16", store.read_layer(L, "fp16", backend), dtype).to(device)
                   for L in range(cfg.num_layers)]
        return OraclePolicy(cfg.num_layers, cfg.intermediate_size, parse_oracle(name), weights,
                            activation(cfg.hidden_act))
    if name == "gate" or name.startswith("gate:"):
        return gate_policy(store, parse_shares(name), dtype, device, kernels=kernels)
    if name.startswith("gate-split"):
        raise ConfigError(f"{name!r} is measured by `m2cache eval` only; a store of format version 3 runs "
                          "gate:A,B,C that way (`m2cache upgrade STORE` lays an older one out so)")
    if name.startswith("predictor:"):  # ad-hoc shares over the store's trained predictors
        spec = {"shares": parse_shares(name).to_dict(), "kind": "predictor"}
        return PredictorPolicy.from_store(store, name, spec, dtype, device)
    if name in stored and stored[name].get("kind") == "gate":
        policy = gate_policy(store, shares_from_spec(stored[name], cfg.num_layers), dtype, device, kernels=kernels)
        policy.name = name
        return policy
    if name in stored:
        return PredictorPolicy.from_store(store, name, stored[name], dtype, device)
    known = ", ".join(list(BUILTIN) + sorted(stored))
    raise ConfigError(f"unknown policy {name!r}; this store has: {known} (see `m2cache policies STORE`)")


def is_gate_policy(store: Store, name: str) -> bool:
    """``gate``, ``gate:A,B,C`` or a stored policy of kind gate."""
    spec = (store.manifest.get("policies") or {}).get(name, {})
    return name == "gate" or name.startswith("gate:") or spec.get("kind") == "gate"


def gate_copy_bytes(store: Store) -> int:
    """What a gate policy keeps resident beside the tiers: its packed INT4 copy of every gate row (one part
    of each INT4 bundle) and the float32 norms that weigh each neuron's gate activation."""
    int4_row = quant.bundle_bytes("int4", 1, store.hidden, store.groups)
    return (int4_row + 4) * store.num_neurons * store.config.num_layers


def resident_policy_bytes(store: Store, name: str) -> int:
    """What policy ``name`` keeps resident beside the tiers: a gate policy's copy of the gate rows, a
    predictor policy's predictors (FP16, as stored), nothing for ``dense-fp16`` and the oracle's bound."""
    if is_gate_policy(store, name):
        return gate_copy_bytes(store)
    spec = (store.manifest.get("policies") or {}).get(name, {})
    if name.startswith("predictor:") or spec.get("kind") == "predictor":
        meta = store.manifest.get("predictors")
        return (store.path / meta["path"]).stat().st_size if meta else 0
    return 0


def fetched_bytes(store: Store, policy: Policy) -> int:
    """The FFN bytes a decode token computes from under ``policy`` over every layer, ``store`` in the view the
    policy fetches: what its FFN takes from the tiers, however much of it they already held."""
    return sum(policy.counts(layer)[p] * store.bundle_bytes(p) for layer in range(store.config.num_layers)
               for p in ("fp16", "int8", "int4"))


def gate_policy(store: Store, shares: Shares | list[Shares], dtype: torch.dtype, device: str | torch.device = "cpu",
                kernels: bool = True) -> GatePolicy:
    """``gate:A,B,C``: each layer's gate rows as the store's INT4 bundles hold them, plus the norms of the
    up rows and down columns (from the FP16 bundles), read once; a split store's gate file holds both. The copy
    stays packed INT4 (what ``resident_bytes`` counts): on the CPU the C kernel scores it as it is; on CUDA
    each layer's rows are dequantised on the device when scored (device memory is the scarce tier there:
    on the 7B shape 28 MB a layer instead of 90). Only the CPU without the kernels holds it dequantised
    to ``dtype``."""
    cfg, dim, groups = store.config, store.hidden, store.groups
    dev = torch.device(device)
    kernel = (kernels and dev.type == "cpu" and cpu_kernels.available()
              and cfg.hidden_act in cpu_kernels.ACTIVATIONS)
    packed = kernel or dev.type == "cuda"
    rows_int4, layer_norms = store.read_gates()
    gates, norms = [], []
    for rows, norm in zip(rows_int4, layer_norms):
        # the packed gate rows are one-part INT4 bundles
        gates.append(rows.to(device) if packed else
                     quant.decode("int4", rows, 1, dim, dtype, groups)[:, 0].contiguous().to(device))
        norms.append(norm.to(device=device, dtype=torch.float32))  # scores in float32: few ties
    return GatePolicy(cfg.num_layers, cfg.intermediate_size, shares, gates, norms, activation(cfg.hidden_act),
                      gate_copy_bytes(store), kernel_act=cfg.hidden_act if kernel else None, group=groups.int4,
                      dtype=dtype)


def up_down_norms(store: Store, raw: torch.Tensor) -> torch.Tensor:
    """||up_j||·||down_j|| [F] float32 of a layer's FP16 bundles ``raw`` as ``store``'s view reads them."""
    return quant.up_down_norms(raw, store.parts, store.hidden)


def policy_figures(store: Store) -> list[dict]:
    """Per policy the store offers (those it cannot run left out): its mean shares, the FFN bytes a decode
    token computes from (``fetched_bytes`` over the view it fetches), what it keeps resident, and its quality
    where measured at build time: what ``m2cache policies`` prints."""
    cfg, quality = store.config, store.manifest.get("quality") or {}
    rows = []
    for name, spec in list_policies(store).items():
        try:
            view = store_for_policy(store, name)
        except ConfigError:  # a version 2 split store: only its gate policies run
            continue
        shares = shares_from_spec(spec, cfg.num_layers)
        per_layer = isinstance(shares, list)
        each = shares if isinstance(shares, list) else [shares]
        mean = {p: sum(getattr(s, p) for s in each) / len(each) for p in ("fp16", "int8", "int4")}
        policy = Policy(cfg.num_layers, store.num_neurons, shares)
        kind = "builtin" if spec.get("builtin") else spec.get("kind", "?")
        rows.append({"name": name, "shares": mean, "per_layer": per_layer, "kind": kind,
                     "fetched": fetched_bytes(view, policy), "resident": resident_policy_bytes(store, name),
                     "quality": quality.get(name)})
    return rows
