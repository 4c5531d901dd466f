"""The quality a store's default policy costs, measured once when the store is built (``m2cache fetch``,
``m2cache convert --measure``) and kept in its manifest, where ``m2cache policies`` and the demo read it."""
from __future__ import annotations

import sys
from pathlib import Path

from m2cache.engine.policies import default_policy_name
from m2cache.model.policy import Policy
from m2cache.offline.evaluate import QualityModel, eval_data, perplexity
from m2cache.storage.reader import Store
from m2cache.storage.writer import write_manifest

BUILD_TOKENS = 1024  # held-out tokens the quality measured when a store is built takes (two windows)


def measure_at_build(store_dir: str | Path, policies: list[str] | None = None, *, tokens: int = BUILD_TOKENS,
                     progress: bool = False, again: bool = False) -> dict[str, dict]:
    """The perplexity cost of ``policies`` (default: the store's default) against the dense FP32 model on
    ``tokens`` held-out tokens of the pydoc prose, and their teacher-forced top-1 agreement with it; kept
    in the manifest's ``quality`` (what ``m2cache policies`` and the demo print). A policy measured before
    is not measured again unless ``again``. Returns the manifest's ``quality``."""
    store = Store(store_dir)
    quality = dict(store.manifest.get("quality") or {})
    names = [n for n in (policies or [default_policy_name(store)]) if again or n not in quality]
    if not names:
        return quality
    if progress:
        print(f"measuring {', '.join(names)} against the dense model on {tokens} held-out tokens (once) ...",
              file=sys.stderr)
    qm = QualityModel(store)
    windows = eval_data(store, None, [], tokens).windows
    dense = Policy(qm.cfg.num_layers, qm.cfg.intermediate_size)
    dense_logits = [qm.logits(w, dense)[:-1] for w in windows]
    dense_ppl, _ = perplexity(qm, windows, dense)
    for name in names:
        ppl, top1 = perplexity(qm, windows, qm.policy(name), None, dense_logits)
        quality[name] = {"ppl": ppl, "dense_ppl": dense_ppl, "ppl_delta": ppl / dense_ppl - 1, "top1": top1,
                         "tokens": sum(len(w) - 1 for w in windows), "text": "pydoc_data prose, held-out tail"}
    m = Store(store_dir).manifest  # as it is now, not as it was opened
    m["quality"] = quality
    write_manifest(store.path, m)
    return quality
