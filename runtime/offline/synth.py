"""``m2cache synth``: a store (and a matching Hugging Face folder) of a given shape with random weights.

For benchmarks at sizes the project cannot download: a LLaMA-2-7B-shaped model costs 13.5 GB of FP16,
so every tensor is generated on demand from its own seed (``seed`` mixed with the tensor's name) and
the store and the HF folder, written in two passes, hold the very same values with memory bounded by
one layer. The values are uniform (std 0.02) from a cheap generator: random bytes from numpy's PCG64
read as int16, the same on every machine and device, several times faster than ``torch.randn``.
Optionally, predictors are fitted briefly to the random model's own activations, so the bench can run
a predictor policy on it (on random weights their recall only decides which neurons get which
precision: the bytes a policy moves do not depend on it, so a short fit is enough).

``bench_model()`` is the bench's default: 8 layers of LLaMA-2-7B (about 3.7 GB of FP16), written once
under ``~/.cache/m2cache`` (``M2CACHE_HOME``) with its GGUF exports.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from m2cache.engine.loading import load_dense
from m2cache.errors import ConfigError
from m2cache.formats.config import ModelConfig
from m2cache.formats.families import layer_tensor_names
from m2cache.model.predictor import LowRankPredictors
from m2cache.offline.progress import ProgressBar
from m2cache.offline.train import (PRESET_DEFAULT, PRESET_POLICIES, collect, recall_at, register_predictors, split_text,
                                   targets, token_windows)
from m2cache.storage.layout import PREDICTORS
from m2cache.storage.reader import Store
from m2cache.storage.safetensors_stream import write_streamed
from m2cache.storage.writer import tensor_shapes, write_store

log = logging.getLogger(__name__)

SHAPES: dict[str, dict[str, Any]] = {
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                      num_kv_heads=32, head_dim=128, rms_norm_eps=1e-5, rope_theta=10000.0, hidden_act="silu",
                      max_position_embeddings=4096),
    # a few MB: smoke tests of the same code path
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0, hidden_act="silu", max_position_embeddings=1024),
}
WEIGHT_STD = 0.02
BOS, EOS = "<s>", "</s>"
CHAT_TEMPLATE = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
FFN_NAMES = ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")


def synth_config(shape: str, layers: int | None = None) -> ModelConfig:
    if shape not in SHAPES:
        raise ConfigError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    kw = dict(SHAPES[shape])
    if layers is not None:
        if layers < 1:
            raise ConfigError(f"--layers must be >= 1, got {layers}")
        kw["num_layers"] = layers
    return ModelConfig(bos_token_id=1, eos_token_ids=(2,), **kw)


class RandomWeights:
    """``get(name)``: the named tensor (FP16, on the CPU), the same values on every call (seeded by name).

    Uniform in [-a, a) with std ``WEIGHT_STD``: PCG64's random bytes read as int16, then scaled. The
    numbers do not depend on the device or on torch's generator, so a store and its HF folder always
    match, and a 7B layer (~200M values) is drawn in about a second."""

    def __init__(self, cfg: ModelConfig, seed: int = 0) -> None:
        self.shapes, self.seed = tensor_shapes(cfg), seed

    def __call__(self, name: str) -> torch.Tensor:
        shape = self.shapes[name]
        if name.endswith("norm.weight"):
            return torch.ones(shape, dtype=torch.float16)
        rng = np.random.default_rng(self.seed * 1_000_003 + zlib.crc32(name.encode()))
        n = int(np.prod(shape))
        raw = torch.frombuffer(bytearray(rng.bytes(2 * n)), dtype=torch.int16)
        scale = WEIGHT_STD * 3**0.5 / 32768  # uniform on [-1, 1) has std 1/sqrt(3)
        return raw.to(torch.float16).mul_(scale).reshape(shape)


def byte_tokenizer() -> dict[str, Any]:
    """A trivial byte-level tokenizer (259 ids: <unk>, <s>, </s>, 256 bytes) that fits any vocab >= 259."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<unk>": 0, BOS: 1, EOS: 2} | {ch: 3 + i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BOS, EOS])
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 1)])
    return {"json": tok.to_str(), "chat_template": CHAT_TEMPLATE, "bos_token": BOS, "eos_token": EOS}


def write_hf_folder(dst: Path, cfg: ModelConfig, get: Callable[[str], torch.Tensor], tokenizer: dict[str, Any],
                    progress: Callable[[int, int], None] | None = None) -> Path:
    """config.json + one FP16 safetensors shard per layer (and one for the rest) + the index transformers
    reads, and the tokenizer (its chat template in tokenizer_config.json). Each tensor is made by ``get``
    when written: memory is bounded by the largest tensor."""
    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shapes = tensor_shapes(cfg)
    groups: dict[str, list[str]] = {"model-rest.safetensors": [n for n in shapes if ".layers." not in n]}
    for i in range(cfg.num_layers):
        groups[f"model-layer{i:03d}.safetensors"] = layer_tensor_names(cfg, i) + [f"model.layers.{i}.{n}" for n in FFN_NAMES]
    weight_map: dict[str, str] = {}
    total = 0
    for k, (shard, names) in enumerate(groups.items()):
        total += write_streamed(tmp / shard, {n: (shapes[n], torch.float16) for n in names},
                                lambda n: get(n).to(torch.float16))
        weight_map |= {n: shard for n in names}
        if progress:
            progress(k + 1, len(groups))
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (tmp / "config.json").write_text(json.dumps(cfg.to_hf() | {"torch_dtype": "float16"}, indent=2))
    (tmp / "tokenizer.json").write_text(tokenizer["json"])
    special = {k: tokenizer[k] for k in ("bos_token", "eos_token") if tokenizer.get(k)}
    (tmp / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", **special}
        | ({"chat_template": tokenizer["chat_template"]} if tokenizer.get("chat_template") else {}), indent=1))
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    return dst


def synth(dst: str | Path, shape: str = "llama2-7b", *, layers: int | None = None, seed: int = 0,
          predictors: bool = True, train_tokens: int = 1024, device: str | None = None,
          progress: bool = True) -> dict[str, Path]:
    """Writes ``dst/store`` and ``dst/hf`` (same random weights); returns both paths."""
    cfg = synth_config(shape, layers)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    get, tok = RandomWeights(cfg, seed), byte_tokenizer()
    t0 = time.monotonic()
    bar = ProgressBar(f"synth {shape} store", cfg.num_layers + 1) if progress else None
    store = write_store(dst / "store", cfg, get, tok, source=f"synth:{shape}:seed={seed}:pcg64-int16", progress=bar)
    hf = write_hf_folder(dst / "hf", cfg, get, tok)
    log.info("synth: wrote %s and %s in %.0fs", store, hf, time.monotonic() - t0)
    if predictors:
        train_synth_predictors(store, tokens=train_tokens, device=device)
    return {"store": store, "hf": hf}


# ---- predictors fitted on the device ---------------------------------------------------------
def train_synth_predictors(store_dir: str | Path, *, tokens: int = 1024, device: str | None = None,
                           rank: int | None = None, epochs: int = 4) -> list[float]:
    """Brief predictor training on the random model's own activations, on ``device`` (cuda when there is
    one). It follows ``m2cache.offline.train`` (same corpus, targets, recall, presets), but keeps every tensor on
    one device: ``train.train_layer`` makes its initial weights with a CPU generator. Returns recall."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    store = Store(store_dir)
    cfg = store.config
    rank = rank or min(128, cfg.hidden_size)
    model = load_dense(store, torch.float32, device)
    windows = token_windows(store, split_text(None)[0], tokens, window=min(512, tokens // 2))
    if len(windows) < 2:
        raise ConfigError(f"--train-tokens {tokens} gives fewer than 2 windows; give more tokens")
    X, Y = collect(model, windows)
    n_val = len(windows[0])
    counts = PRESET_POLICIES[PRESET_DEFAULT].counts(cfg.intermediate_size)
    keep = sum(counts.values())
    weights, recall = [], []
    for layer in range(cfg.num_layers):
        p = _fit_layer(X[layer][:-n_val], Y[layer][:-n_val], model.ffn[layer], rank, keep, epochs, seed=layer)
        with torch.no_grad():
            s = torch.nn.functional.linear(torch.nn.functional.linear(X[layer][-n_val:], p[0], p[1]).relu(), p[2], p[3])
        recall.append(recall_at(s.cpu(), Y[layer][-n_val:].cpu(), keep))
        weights.append([t.cpu() for t in p])
        X[layer] = Y[layer] = torch.empty(0)
    del model
    preds = LowRankPredictors(*(torch.stack([w[i] for w in weights]) for i in range(4)))
    preds.save(store.path / PREDICTORS, {"rank": str(rank), "loss": "bce", "synth": "1"})
    register_predictors(store, rank=rank, tokens=len(windows) * len(windows[0]), loss="bce", recall=recall)
    log.info("synth predictors: mean recall %.3f at %d of %d neurons", sum(recall) / len(recall), keep,
             cfg.intermediate_size)
    return recall


def _fit_layer(X: torch.Tensor, Y: torch.Tensor, W: torch.Tensor, rank: int, keep: int, epochs: int,
               seed: int, batch: int = 256, lr: float = 2e-3) -> list[torch.Tensor]:
    """``train.train_layer``'s recipe (SVD-spanned W1, BCE on top-keep membership, Adam, one-cycle) on X's device."""
    dev = X.device
    g = torch.Generator(device=dev).manual_seed(seed)
    F_, _, D = W.shape
    half = rank // 2
    _, _, v = torch.svd_lowrank(W[:, :2].reshape(2 * F_, D).float(), q=max(half, rank - half), niter=2)
    w1 = torch.cat((v[:, :half].T, -v[:, :rank - half].T))
    params = [w1.contiguous(), torch.zeros(rank, device=dev),
              torch.randn(F_, rank, generator=g, device=dev) * (1.0 / rank) ** 0.5, torch.zeros(F_, device=dev)]
    params = [p.requires_grad_() for p in params]
    opt = torch.optim.Adam(params, lr=lr)
    T = targets(Y, keep, "bce")
    steps = epochs * ((X.shape[0] + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    F = torch.nn.functional
    for _ in range(epochs):
        for idx in torch.randperm(X.shape[0], generator=g, device=dev).split(batch):
            s = F.linear(F.linear(X[idx], params[0], params[1]).relu(), params[2], params[3])
            err = F.binary_cross_entropy_with_logits(s, T[idx])
            opt.zero_grad(set_to_none=True)
            err.backward()
            opt.step()
            sched.step()
    return [p.detach() for p in params]


def cmd_synth(args) -> int:
    t0 = time.monotonic()
    out = synth(args.dst, args.shape, layers=args.layers, seed=args.seed, predictors=not args.no_predictors,
                train_tokens=args.train_tokens, device=args.device)
    print(f"store: {out['store']}\nhf:    {out['hf']}\n({time.monotonic() - t0:.0f}s)")
    return 0


def add_synth_command(sub) -> None:
    p = sub.add_parser("synth", help="write a store and a matching HF folder of a model shape with random weights")
    p.add_argument("--shape", default="llama2-7b", choices=sorted(SHAPES))
    p.add_argument("dst", help="folder to create: DST/store and DST/hf")
    p.add_argument("--layers", type=int, default=None, help="fewer decoder layers than the shape has")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-predictors", action="store_true", help="skip fitting predictors (no sparse policy then)")
    p.add_argument("--train-tokens", type=int, default=1024, help="activation tokens the predictors see")
    p.add_argument("--device", default=None, help="where predictors train (default: cuda if available)")
    p.set_defaults(func=cmd_synth)
