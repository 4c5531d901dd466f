"""m2cache: run decoder LLMs (LLaMA, Qwen2/3, Mistral, Gemma 3) whose weights do not fit the device, from
tiered HBM/DRAM/SSD neurons.

    from m2cache import Engine, EngineConfig
    async with Engine.open(store_dir, EngineConfig(hbm_budget="48MB", dram_budget="96MB")) as engine:
        async for text in engine.generate("Why is the sky blue?", max_new_tokens=64):
            print(text, end="", flush=True)
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Engine", "EngineConfig", "__version__"]

if TYPE_CHECKING:
    from m2cache.engine.config import EngineConfig
    from m2cache.engine.engine import Engine


def __getattr__(name: str) -> Any:
    # lazy, so `import m2cache.storage...` does not pull in the whole runtime
    if name == "Engine":
        from m2cache.engine.engine import Engine

        return Engine
    if name == "EngineConfig":
        from m2cache.engine.config import EngineConfig

        return EngineConfig
    raise AttributeError(name)
