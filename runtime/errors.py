"""Errors a user can meet. Each says what happened and what to do.

A broken invariant inside m2cache is a bug and raises AssertionError/RuntimeError instead.
"""
from __future__ import annotations

import sys
from collections.abc import Callable


class M2CacheError(Exception):
    """Base class of every error m2cache raises for a condition the user can meet."""


class StoreError(M2CacheError):
    """A store folder cannot be used."""


class StoreNotFoundError(StoreError):
    """The store folder or its manifest is missing."""


class StoreVersionError(StoreError):
    """The store was written by an incompatible format version."""


class ChecksumError(StoreError):
    """A block of the store does not match its checksum, with the same bytes on every read: the file is
    damaged where it lies."""


class TruncatedStoreError(StoreError):
    """A store file is shorter than its manifest says."""


class UnsupportedArchitectureError(M2CacheError):
    """The checkpoint or store is of a model family m2cache does not run."""


class ConvertError(M2CacheError):
    """A source checkpoint cannot be converted."""


class ConfigError(M2CacheError, ValueError):
    """An EngineConfig value is invalid."""


class BudgetError(ConfigError):
    """A memory budget is too small for the model's working set."""


class SSDError(M2CacheError):
    """A read from the SSD tier failed."""


class TransientSSDError(SSDError):
    """A read failed in a way that may succeed when retried."""


class PermanentSSDError(SSDError):
    """A read failed and will keep failing."""


class UnstableReadError(TransientSSDError):
    """A block failed its checksum on every read, with different bytes each time: what flips them is the
    disk or the path to it, not the file, which may well be intact."""


class OverloadedError(M2CacheError):
    """The engine could not admit a request in time: running requests hold its KV cache."""


class EngineClosedError(M2CacheError):
    """The engine was closed, or failed and closed itself."""


class PredictorMissingError(M2CacheError):
    """A sparse policy needs predictors that the store does not have."""


class MissingExtraError(M2CacheError, ImportError):
    """An optional part of m2cache is used without the packages of its extra installed."""


def require_extra(extra: str, *modules: str, what: str) -> None:
    """Raises ``MissingExtraError`` naming ``pip install 'm2cache[extra]'`` when a module of ``extra`` is missing."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtraError(f"{what} needs {', '.join(missing)} (the '{extra}' extra): "
                                f"pip install 'm2cache[{extra}]' (or `make install` in a checkout)")


def command_exit(run: Callable[[], int]) -> int:
    """A command's exit code, as the ``m2cache`` commands end: its own on success; an m2cache error printed as
    ``m2cache: ...`` on stderr, 1; interrupted, 130; a closed pipe (``| head``), 0."""
    try:
        return run()
    except M2CacheError as e:
        print(f"m2cache: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("m2cache: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
