"""Policy lookup by name: built-in ones and those stored in a store's manifest."""
from __future__ import annotations

import torch

from m2cache.errors import ConfigError
from m2cache.model.llama import activation
from m2cache.model.policy import GatePolicy, OraclePolicy, Policy, Shares
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


def load_policy(store: Store, name: str | None, dtype: torch.dtype, device: str | torch.device = "cpu") -> Policy:
    name = name or default_policy_name(store)
    cfg = store.config
    if name == "dense-fp16":
        return Policy(cfg.num_layers, cfg.intermediate_size)
    if name.startswith("oracle"):
        backend = PlainBackend()
        weights = [store.decode("fp16", store.read_layer(L, "fp16", backend), dtype).to(device)
                   for L in range(cfg.num_layers)]
        return OraclePolicy(cfg.num_layers, cfg.intermediate_size, parse_oracle(name), weights,
                            activation(cfg.hidden_act))
    if name == "gate" or name.startswith("gate:"):
        return gate_policy(store, parse_shares(name), dtype, device)
    stored = store.manifest.get("policies") or {}
    if name.startswith("predictor:"):  # ad-hoc shares over the store's trained predictors
        from m2cache.model.predictor import PredictorPolicy

        spec = {"shares": parse_shares(name).to_dict(), "kind": "predictor"}
        return PredictorPolicy.from_store(store, name, spec, dtype, device)
    if name in stored:
        from m2cache.model.predictor import PredictorPolicy  # only stores with predictors need it

        return PredictorPolicy.from_store(store, name, stored[name], dtype, device)
    known = ", ".join(list(BUILTIN) + sorted(stored))
    raise ConfigError(f"unknown policy {name!r}; this store has: {known} (see `m2cache policies STORE`)")


def gate_policy(store: Store, shares: Shares, dtype: torch.dtype, device: str | torch.device = "cpu") -> GatePolicy:
    """``gate:A,B,C``: each layer's gate rows as the store's INT4 bundles hold them, plus the norms of the
    up rows and down columns (from the FP16 bundles), read once."""
    cfg, backend = store.config, PlainBackend()
    gates, norms = [], []
    for layer in range(cfg.num_layers):
        gates.append(store.decode("int4", store.read_layer(layer, "int4", backend), dtype)[:, 0].contiguous().to(device))
        w = store.decode("fp16", store.read_layer(layer, "fp16", backend), torch.float32)
        norms.append((w[:, 1].norm(dim=1) * w[:, 2].norm(dim=1)).to(device=device, dtype=dtype))
    per_gate = store.bundle_bytes("int4") // store.parts  # one part's share of an INT4 bundle
    return GatePolicy(cfg.num_layers, cfg.intermediate_size, shares, gates, norms, activation(cfg.hidden_act),
                      per_gate * cfg.intermediate_size * cfg.num_layers)
