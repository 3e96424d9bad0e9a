"""edgekit's import graph has no cycles: every ``import`` in every module (top level or inside a
function) is an edge, so a lazy import cannot hide a circle between two layers."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "edgekit"


def modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        rel = p.relative_to(PKG.parent).with_suffix("")
        out[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = p
    return out


def edges(name: str, path: Path, known) -> set[str]:
    """edgekit modules ``name`` imports: the module named and the packages above it (their
    ``__init__`` runs first), except ``name``'s own ancestors (already initialised)."""
    base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = ".".join(base[: len(base) - node.level + 1] + [node.module] if node.module else
                           base[: len(base) - node.level + 1]) if node.level else node.module
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        for t in targets:
            parts = t.split(".")
            for i in range(1, len(parts) + 1):
                cand = ".".join(parts[:i])
                if cand in known and cand != name and not name.startswith(cand + "."):
                    out.add(cand)
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == "open":
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = "done"
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_finder_reports_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_edgekit_has_no_import_cycle():
    known = modules()
    graph = {n: edges(n, p, known) for n, p in known.items()}
    # the walker sees lazy (function-level) imports too
    assert "edgekit.quantize.mixed" in graph["edgekit.pipeline"] and "edgekit.autosearch" in graph["edgekit.pipeline"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
