"""Fixtures of the stress tests (``make stress``): one 20-layer tiny model per session."""
from __future__ import annotations

import pytest

from stress import scenarios as S


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    with S.one_torch_thread():
        yield


@pytest.fixture(scope="session")
def deep(tmp_path_factory: pytest.TempPathFactory) -> S.Model:
    return S.build_tiny(tmp_path_factory.mktemp("stress"))
