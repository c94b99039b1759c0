"""The house rules that keep the code readable as features land: imports point down the floors (no
circle, function-level imports included), `forge/` never imports the MCP layer, and no module grows
past the size a newcomer can hold in their head."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_MODULE_LINES = 400


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """Every project module ``path`` imports, at any depth (inside functions too), resolved to the
    module that holds the name: ``from forge import disk`` is ``forge.disk``; ``from forge.disk import
    free_bytes`` is ``forge.disk``."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:  # `import forge.x.y` names forge.x.y; keep the longest known
                name = name.rpartition(".")[0]
            if name and name != me:
                found.add(name)
    return found


def project_graph(*packages: str) -> dict[str, set[str]]:
    files = [p for package in packages for p in (ROOT / package).rglob("*.py")]
    known = {module_name(p) for p in files}
    return {module_name(p): imported_modules(p, known) for p in files}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each strongly connected group of more than one module (Tarjan), as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def test_forge_has_no_import_circle_even_through_function_level_imports():
    graph = project_graph("forge")
    assert "forge.tokens" in graph["forge.measure_set"]  # imported inside a function there: seen too
    assert cycles(graph) == []


def test_the_mcp_layer_has_no_import_circle_either():
    assert cycles(project_graph("forge", "mcp_servers")) == []


def test_forge_never_imports_the_mcp_layer():
    offenders = {module: sorted(n for n in names if n.startswith("mcp_servers"))
                 for module, names in project_graph("forge", "mcp_servers").items() if module.startswith("forge")}
    assert {m: n for m, n in offenders.items() if n} == {}


def test_the_cycle_finder_reports_a_circle_it_is_shown():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_of_the_product_is_longer_than_a_newcomer_can_hold_in_their_head():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text(encoding="utf-8").splitlines())
             for package in ("forge", "mcp_servers") for p in (ROOT / package).rglob("*.py")}
    assert {path: n for path, n in sizes.items() if n > MAX_MODULE_LINES} == {}
