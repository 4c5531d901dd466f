"""The package's import structure, as ``tools/import_graph.py`` reads it: every room imports only rooms below it
in the tool's ``LAYERS``, no module import closes a circle, and every import of m2cache's own inside a function
says why it is there."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parent.parent


def _tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("import_graph", REPO / "tools" / "import_graph.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def test_the_package_imports_down_its_layers_without_cycles_or_unexplained_lazy_imports() -> None:
    text, problems = _tool().report(REPO)
    assert problems == 0, text


def test_an_upward_import_a_cycle_and_an_unexplained_lazy_import_are_each_found(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text('[tool.setuptools]\npackage-dir = { "m2cache" = "runtime", '
                                             '"m2cache.storage" = "storage" }\n')
    for folder in ("runtime", "runtime/engine", "storage"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text("")
    (tmp_path / "runtime/engine/engine.py").write_text("from m2cache.storage import reader\n")
    (tmp_path / "storage/reader.py").write_text("def f():\n    from m2cache.engine import engine\n")
    text, problems = _tool().report(tmp_path)
    assert problems == 3, text  # storage -> engine; reader <-> engine; reader's import with no reason
    assert "storage -> engine: storage.reader:2 imports engine.engine (in a function)" in text


def test_importing_m2cache_loads_neither_torch_nor_the_engine() -> None:
    code = "import sys, m2cache; print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('m2cache.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr
