"""The import rules of ``src/``, read from the source (AST), not from what happens to be imported.

- No import cycle between modules: every import counts, the ones inside functions and under
  ``TYPE_CHECKING`` too (a cycle hidden there is still two modules that need each other).
- Outside ``ltx2_residency`` (the pipeline, the tools), the core is used through its public API
  only: ``import ltx2_residency`` or ``from ltx2_residency import NAME`` with ``NAME`` in its
  ``__all__``, and no attribute of the package outside ``__all__`` (dunders aside).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import ltx2_residency

SRC = Path(__file__).resolve().parents[1] / "src"
CORE = "ltx2_residency"


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _package(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def _imports(name: str, path: Path) -> Iterator[tuple[int, str, str | None]]:
    """``(line, module, imported name or None)`` for every import in ``path``, relative ones resolved."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, None
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = _package(name, path).split(".")
                anchor = package[: len(package) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                yield node.lineno, base, alias.name


def _edges() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for name, path in MODULES.items():
        for _, module, imported in _imports(name, path):
            target = f"{module}.{imported}" if imported and f"{module}.{imported}" in MODULES else module
            if target in MODULES and target != name:
                graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_walk_sees_the_packages() -> None:
    assert {"ltx2_residency", "ltx2_residency.manager", "ltx2_pipeline.cli", "ltx2_tools.bench"} <= set(MODULES)
    graph = _edges()
    assert "ltx2_residency.errors" in graph["ltx2_residency.domain"]  # a relative import resolved


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_in_src() -> None:
    cycles = _cycles(_edges())
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def _where(path: Path) -> str:
    return str(path.relative_to(SRC)) if path.is_relative_to(SRC) else path.name


def _core_uses(name: str, path: Path) -> Iterator[str]:
    public = set(ltx2_residency.__all__)
    tree = ast.parse(path.read_text(), str(path))
    aliases = set()
    for line, module, imported in _imports(name, path):
        if module == CORE and imported is not None and imported not in public:
            yield f"{_where(path)}:{line}: from {CORE} import {imported} (not in __all__)"
        elif module.startswith(CORE + "."):
            yield f"{_where(path)}:{line}: {module} is not the public API; import from {CORE}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname or a.name for a in node.names if a.name == CORE}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr not in public and not node.attr.startswith("__")):
            yield f"{_where(path)}:{node.lineno}: {CORE}.{node.attr} (not in __all__)"


def test_outside_the_core_only_the_public_api_is_used() -> None:
    outside = {n: p for n, p in MODULES.items() if n != CORE and not n.startswith(CORE + ".")}
    assert "ltx2_pipeline.two_stage" in outside
    violations = [v for n, p in outside.items() for v in _core_uses(n, p)]
    assert not violations, "\n".join(violations)


def test_the_public_api_check_catches_a_private_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import ltx2_residency\nfrom ltx2_residency.ops.merge import MergeStack\n"
                   "from ltx2_residency import _private\nx = ltx2_residency.manager\n")
    found = list(_core_uses("bad", bad))
    assert len(found) == 3, found
