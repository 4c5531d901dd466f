"""``python tools/import_graph.py [--check]``: m2cache's import structure, read from the source with ``ast``.

Prints the rooms (the package's top-level subpackages and its root modules), the arrows between rooms
with counts, the arrows that point up against ``LAYERS``, the import cycles between modules (imports
at any level: a function's import closes a circle as surely as one at the top, only later), and the
imports inside functions, split into m2cache's own modules and third-party packages. With ``--check``
it exits 1 when there is an upward arrow, a cycle, or an internal import inside a function with no
comment saying why (its own, or its module's ``# imports inside functions: WHY`` where the import does keep
a heavy package out). The folders come from pyproject's ``package-dir`` (``runtime/`` is ``m2cache``,
``storage/`` is ``m2cache.storage``, ...). Standard library only.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import itertools
import sys
import tomllib
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "m2cache"

# The intended layering, bottom first. A room may import rooms in lower layers only; rooms that share
# a layer are peers and import neither each other (storage and model above all: what both need lives
# in formats). The root room is the package's modules beside its subpackages (errors, ...); "__init__"
# is the package itself, whose lazy attributes re-export the engine.
LAYERS: list[tuple[str, ...]] = [
    ("root",),              # errors and the run's figures: what every room may say
    ("trace",),             # the span recorder every layer may write to, and its readers
    ("formats",),           # the vocabulary storage and model share: model config, quantised layouts
    ("storage", "model"),   # the store on disk and in memory; the network
    ("actors",),            # the concurrency
    ("engine",),            # wires the actors
    ("offline",),           # writes and judges stores; may run the engine
    ("bench", "serve"),     # measure the engine; serve it over HTTP
    ("cli",),               # the command: imports everything, imported by nothing
    ("__init__",),          # the package's facade: ``from m2cache import Engine``
]

# What an import inside a function may rightly keep out of its importer's own import: torch (a second
# and some 300 MB), and the packages behind an extra (pyproject's optional-dependencies), imported where
# they are used so that ``import m2cache`` neither needs nor loads them.
HEAVY = {"torch"}
# Packages behind an extra (pyproject's optional-dependencies), imported where they are used so that
# ``import m2cache`` neither needs nor loads them.
OPTIONAL = {"transformers", "accelerate", "matplotlib", "gguf", "fastapi", "uvicorn", "starlette",
            "prometheus_client", "llama_cpp", "openai", "httpx"}


@dataclass(frozen=True)
class Import:
    source: str          # the importing module
    target: str          # the imported module (the deepest one that exists, for m2cache's own)
    line: int
    in_function: bool
    type_only: bool      # under ``if TYPE_CHECKING:``
    reason: str          # the comment beside or above it, if any


def modules(repo: Path) -> dict[str, Path]:
    """Every module of the package: dotted name -> file."""
    pyproject = tomllib.loads((repo / "pyproject.toml").read_text())
    found: dict[str, Path] = {}
    for package, folder in pyproject["tool"]["setuptools"]["package-dir"].items():
        root = repo / folder
        for path in sorted(root.rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if not all((root / Path(*parts[:i]) / "__init__.py").exists() for i in range(len(parts))):
                continue  # not inside a package (a script folder)
            name = ".".join((package, *parts))
            found[name.removesuffix(".__init__")] = path
    return found


def room(module: str, known: dict[str, Path]) -> str:
    if module == PACKAGE:
        return "__init__"
    top = module.split(".")[1]
    return top if known[f"{PACKAGE}.{top}"].name == "__init__.py" else "root"


def _reason(lines: list[str], node: ast.stmt, function: ast.AST | None) -> str:
    """The comment on the import's line, on the lines right above it, or opening its function."""
    own = lines[node.lineno - 1]
    if "#" in own:
        return own.split("#", 1)[1].strip()
    above = lines[node.lineno - 2].strip() if node.lineno > 1 else ""
    if above.startswith("#"):
        return above.strip("# ")
    if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
        body = function.body
        if len(body) > 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            body = body[1:]  # after the docstring
        opening = lines[function.lineno:body[0].lineno - 1]
        comments = [c.strip("# \n") for c in opening if c.strip().startswith("#")]
        if comments:
            return comments[0]
    return ""


class _Collector(ast.NodeVisitor):
    def __init__(self, name: str, is_package: bool, known: dict[str, Path], lines: list[str]) -> None:
        self.name, self.is_package, self.known, self.lines = name, is_package, known, lines
        self.functions: list[ast.AST] = []
        self.type_only = 0
        self.found: list[Import] = []

    def _add(self, node: ast.stmt, target: str) -> None:
        function = self.functions[-1] if self.functions else None
        self.found.append(Import(self.name, target, node.lineno, bool(self.functions), self.type_only > 0,
                                 _reason(self.lines, node, function)))

    def _own(self, dotted: str) -> str:
        while dotted not in self.known and "." in dotted:
            dotted = dotted.rsplit(".", 1)[0]
        return dotted

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            own = alias.name == PACKAGE or alias.name.startswith(PACKAGE + ".")
            self._add(node, self._own(alias.name) if own else alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            package = self.name if self.is_package else self.name.rsplit(".", 1)[0]
            anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            base = f"{anchor}.{base}" if base else anchor
        if not (base == PACKAGE or base.startswith(PACKAGE + ".")):
            self._add(node, base)
            return
        for target in sorted({self._own(f"{base}.{a.name}") if f"{base}.{a.name}" in self.known else self._own(base)
                              for a in node.names}):
            self._add(node, target)

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.functions.append(node)
        self.generic_visit(node)
        self.functions.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = _function

    def visit_If(self, node: ast.If) -> None:
        test = ast.unparse(node.test)
        guarded = test in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
        self.type_only += guarded
        for child in node.body:
            self.visit(child)
        self.type_only -= guarded
        for child in node.orelse:
            self.visit(child)


DECLARED = "# imports inside functions:"


def imports(known: dict[str, Path]) -> tuple[list[Import], dict[str, str]]:
    """Every import statement of the package, and each module's ``# imports inside functions: WHY``."""
    found: list[Import] = []
    declared: dict[str, str] = {}
    for name, path in known.items():
        text = path.read_text()
        lines = text.splitlines()
        collector = _Collector(name, path.name == "__init__.py", known, lines)
        collector.visit(ast.parse(text, str(path)))
        found += collector.found
        for n, line in enumerate(lines):
            if line.startswith(DECLARED):
                rest = [c.lstrip("# ") for c in itertools.takewhile(lambda c: c.startswith("#"), lines[n + 1:])]
                declared[name] = " ".join([line[len(DECLARED):].strip(), *rest])
    return found, declared


def cycles(edges: set[tuple[str, str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's, iterative)."""
    graph: dict[str, list[str]] = defaultdict(list)
    for a, b in sorted(edges):
        graph[a].append(b)
        graph.setdefault(b, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, 0)]
        while work:
            node, i = work.pop()
            if i == 0:
                index[node] = low[node] = len(index)
                stack.append(node)
                on_stack.add(node)
            if i < len(graph[node]):
                work.append((node, i + 1))
                nxt = graph[node][i]
                if nxt not in index:
                    work.append((nxt, 0))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            if low[node] == index[node]:
                component = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    component.append(top)
                    if top == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
    return sorted(found)


def heavy(found: list[Import], known: dict[str, Path]) -> dict[str, frozenset[str]]:
    """Module -> the HEAVY and OPTIONAL packages importing it loads (its top-level imports, followed)."""
    own: dict[str, set[str]] = defaultdict(set)
    edges: dict[str, set[str]] = defaultdict(set)
    for i in found:
        if i.in_function or i.type_only:
            continue
        if i.target in known:
            edges[i.source].add(i.target)
        elif i.target.split(".")[0] in HEAVY | OPTIONAL:
            own[i.source].add(i.target.split(".")[0])
    loads: dict[str, frozenset[str]] = {}
    for start in known:
        seen, todo, got = {start}, [start], set()
        while todo:
            module = todo.pop()
            got |= own[module]
            todo += [m for m in edges[module] if m not in seen]
            seen.update(edges[module])
        loads[start] = frozenset(got)
    return loads


def _short(module: str) -> str:
    return module.removeprefix(PACKAGE + ".") or PACKAGE


def report(repo: Path) -> tuple[str, int]:
    """The report's text, and how many problems ``--check`` fails on."""
    known = modules(repo)
    found, declared = imports(known)
    internal = [i for i in found if i.target in known and i.target != i.source]
    layer = {r: n for n, rooms in enumerate(LAYERS) for r in rooms}
    out: list[str] = []

    rooms: dict[str, list[str]] = defaultdict(list)
    for name in known:
        rooms[room(name, known)].append(name)
    out.append(f"rooms: {len(rooms)}")
    for r in sorted(rooms, key=lambda r: (layer.get(r, -1), r)):
        where = f"layer {layer[r]}" if r in layer else "NOT IN LAYERS"
        out.append(f"  {r:<10} {where:<14} {len(rooms[r])} modules")

    arrows: Counter[tuple[str, str]] = Counter()
    lazy: Counter[tuple[str, str]] = Counter()
    pairs = {(i.source, i.target, i.in_function) for i in internal if not i.type_only}
    for source, target, in_function in pairs:
        arrow = (room(source, known), room(target, known))
        if arrow[0] != arrow[1]:
            arrows[arrow] += 1
            lazy[arrow] += in_function
    out.append(f"\narrows between rooms: {len(arrows)} (count: module -> module imports, of them in functions)")
    for (a, b), n in sorted(arrows.items(), key=lambda kv: (layer.get(kv[0][0], -1), kv[0])):
        out.append(f"  {a:>10} -> {b:<10} {n:>3}  ({lazy[(a, b)]} in functions)")

    against = [i for i in internal if not i.type_only and room(i.source, known) != room(i.target, known)
               and layer.get(room(i.source, known), -1) <= layer.get(room(i.target, known), -1)]
    out.append(f"\nupward or sideways arrows (against LAYERS): {len(against)}")
    for i in sorted(against, key=lambda i: (i.source, i.line)):
        where = "in a function" if i.in_function else "at the top"
        out.append(f"  {room(i.source, known)} -> {room(i.target, known)}: {_short(i.source)}:{i.line} "
                   f"imports {_short(i.target)} ({where})")

    runtime_edges = {(i.source, i.target) for i in internal if not i.type_only}
    circles = cycles(runtime_edges)
    out.append(f"\nimport cycles between modules (any level, TYPE_CHECKING left out): {len(circles)}")
    for component in circles:
        members = set(component)
        out.append("  " + ", ".join(_short(m) for m in component))
        for i in sorted(internal, key=lambda i: (i.source, i.line)):
            if i.source in members and i.target in members and not i.type_only:
                where = "in a function" if i.in_function else "at the top"
                out.append(f"      {_short(i.source)}:{i.line} -> {_short(i.target)} ({where})")
    type_circles = [c for c in cycles({(i.source, i.target) for i in internal}) if c not in circles]
    out.append(f"cycles closed only by TYPE_CHECKING imports (no import at run time): {len(type_circles)}")
    for component in type_circles:
        out.append("  " + ", ".join(_short(m) for m in component))

    loads = heavy(found, known)
    inside = [i for i in internal if i.in_function and not i.type_only]
    # a module's declaration covers the imports that do keep something heavy out of it, and only those
    inside = [i if i.reason or i.source not in declared or not loads[i.target] - loads[i.source]
              else dataclasses.replace(i, reason="the module's, below") for i in inside]
    unexplained = [i for i in inside if not i.reason]
    kept_out = [i for i in inside if loads[i.target] - loads[i.source]]
    out.append(f"\nimports inside functions, m2cache's own modules: {len(inside)} "
               f"({len(unexplained)} without a comment saying why; {len(kept_out)} keep a heavy package out of "
               "their importer's own import, marked [loads ...])")
    for i in sorted(inside, key=lambda i: (i.source, i.line)):
        extra = loads[i.target] - loads[i.source]
        tag = f" [loads {', '.join(sorted(extra))}]" if extra else ""
        why = f"  # {i.reason}" if i.reason else ""
        out.append(f"  {_short(i.source)}:{i.line} -> {_short(i.target)}{tag}{why}")
    covering = sorted({i.source for i in inside if i.reason == "the module's, below"})
    if covering:
        out.append("  the modules' reasons (their ``# imports inside functions:``):")
        out += [f"    {_short(m)}: {declared[m]}" for m in covering]

    third = [i for i in found if i.in_function and i.target.split(".")[0] != PACKAGE]
    kinds: dict[str, Counter[str]] = {"optional extras": Counter(), "core dependencies": Counter(),
                                      "standard library": Counter()}
    for i in third:
        top = i.target.split(".")[0]
        kind = ("optional extras" if top in OPTIONAL else
                "standard library" if top in sys.stdlib_module_names else "core dependencies")
        kinds[kind][top] += 1
    out.append(f"\nimports inside functions, third-party and standard library: {len(third)}")
    for kind, counts in kinds.items():
        listed = ", ".join(f"{name} {n}" for name, n in sorted(counts.items()))
        out.append(f"  {kind}: {sum(counts.values())}" + (f"  ({listed})" if listed else ""))
    return "\n".join(out), len(against) + len(circles) + len(unexplained)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parent.parent,
                        help="the checkout (default: the one holding this script)")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 on an upward arrow, a cycle, or an unexplained internal import in a function")
    args = parser.parse_args(argv)
    text, problems = report(args.repo)
    print(text)
    return 1 if args.check and problems else 0


if __name__ == "__main__":
    sys.exit(main())
