"""Policy lookup by name: built-in ones and those stored in a store's manifest."""
from __future__ import annotations

import torch

from m2cache.errors import ConfigError
from m2cache.model.llama import activation
from m2cache.model.policy import GatePolicy, OraclePolicy, Policy, Shares
from m2cache.storage import quant
from m2cache.storage.reader import PlainBackend, Store

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


def load_policy(store: Store, name: str | None, dtype: torch.dtype, device: str | torch.device = "cpu",
                kernels: bool = True) -> Policy:
    """The policy ``name`` (None: the store's default); ``kernels`` False keeps a gate policy off the C
    kernels (the engine's ``cpu_kernels``)."""
    name = name or default_policy_name(store)
    cfg = store.config
    stored = store.manifest.get("policies") or {}
    if store.split and not is_gate_policy(store, name):
        raise ConfigError(f"{store.path} is a split store (up/down fetched, INT4 gate rows resident): only gate "
                          f"policies run on it (gate:A,B,C, {', '.join(sorted(stored)) or 'none stored'}); "
                          f"{name!r} needs the FP16 gate rows of the store it was split from")
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
        raise ConfigError(f"{name!r} is measured by `m2cache eval` only; to run it, write a split store "
                          "(`m2cache split-gate STORE DST`) and run gate:A,B,C there")
    if name.startswith("predictor:"):  # ad-hoc shares over the store's trained predictors
        from m2cache.model.predictor import PredictorPolicy

        spec = {"shares": parse_shares(name).to_dict(), "kind": "predictor"}
        return PredictorPolicy.from_store(store, name, spec, dtype, device)
    if name in stored and stored[name].get("kind") == "gate":
        from m2cache.model.predictor import shares_from_spec

        policy = gate_policy(store, shares_from_spec(stored[name], cfg.num_layers), dtype, device, kernels=kernels)
        policy.name = name
        return policy
    if name in stored:
        from m2cache.model.predictor import PredictorPolicy  # only stores with predictors need it

        return PredictorPolicy.from_store(store, name, stored[name], dtype, device)
    known = ", ".join(list(BUILTIN) + sorted(stored))
    raise ConfigError(f"unknown policy {name!r}; this store has: {known} (see `m2cache policies STORE`)")


def is_gate_policy(store: Store, name: str) -> bool:
    """``gate``, ``gate:A,B,C`` or a stored policy of kind gate."""
    spec = (store.manifest.get("policies") or {}).get(name, {})
    return name == "gate" or name.startswith("gate:") or spec.get("kind") == "gate"


def gate_copy_bytes(store: Store) -> int:
    """What a gate policy's packed INT4 copy of every gate row holds: one part of each INT4 bundle."""
    return store.bundle_bytes("int4") // store.parts * store.num_neurons * store.config.num_layers


def gate_policy(store: Store, shares: Shares | list[Shares], dtype: torch.dtype, device: str | torch.device = "cpu",
                kernels: bool = True) -> GatePolicy:
    """``gate:A,B,C``: each layer's gate rows as the store's INT4 bundles hold them, plus the norms of the
    up rows and down columns (from the FP16 bundles), read once; a split store's gate file holds both. The copy
    stays packed INT4 (what ``resident_bytes`` counts): on the CPU the C kernel scores it as it is; on CUDA
    each layer's rows are dequantised on the device when scored (device memory is the scarce tier there:
    on the 7B shape 28 MB a layer instead of 90). Only the CPU without the kernels holds it dequantised
    to ``dtype``."""
    from m2cache.model import cpu_kernels

    cfg, backend, dim, groups = store.config, PlainBackend(), store.hidden, store.groups
    dev = torch.device(device)
    kernel = (kernels and dev.type == "cpu" and cpu_kernels.available()
              and cfg.hidden_act in cpu_kernels.ACTIVATIONS)
    packed = kernel or dev.type == "cuda"
    split_gates, split_norms = store.read_gates() if store.split else (None, None)
    gates, norms = [], []
    for layer in range(cfg.num_layers):
        rows = split_gates[layer] if split_gates is not None else \
            quant.select_parts("int4", store.read_layer(layer, "int4", backend), 3, dim, groups, 0, 1)
        # the packed gate rows are one-part INT4 bundles
        gates.append(rows.to(device) if packed else
                     quant.decode("int4", rows, 1, dim, dtype, groups)[:, 0].contiguous().to(device))
        norm = split_norms[layer] if split_norms is not None else \
            up_down_norms(store, store.read_layer(layer, "fp16", backend))
        norms.append(norm.to(device=device, dtype=torch.float32))  # scores in float32: few ties
    return GatePolicy(cfg.num_layers, cfg.intermediate_size, shares, gates, norms, activation(cfg.hidden_act),
                      gate_copy_bytes(store), kernel_act=cfg.hidden_act if kernel else None, group=groups.int4,
                      dtype=dtype)


NORM_CHUNK = 1024  # neurons dequantised at a time: on the 7B shape 50 MB, not a whole layer's 540 MB


def up_down_norms(store: Store, raw: torch.Tensor) -> torch.Tensor:
    """||up_j||·||down_j|| [F] float32 of a layer's FP16 bundles ``raw``, a chunk of neurons at a time."""
    out = []
    for chunk in raw.split(NORM_CHUNK):
        w = store.decode("fp16", chunk, torch.float32)  # [n, P, D]: up and down are the last two parts
        out.append(w[:, -2].norm(dim=1) * w[:, -1].norm(dim=1))
    return torch.cat(out)
