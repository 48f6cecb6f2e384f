"""No import cycles between the project's own modules.

The graph is built from the source with `ast`: every `import` / `from ... import`, at module level or
inside a function alike (a function-level import still ties the two modules together), resolved to
the project's module files (a package's __init__ is not a node: importing `pkg.mod` through `pkg`
does not count as depending on everything `pkg/__init__.py` imports). Generated code (gen/) is left
out. A cycle is a strongly connected component of more than one module.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("vbert", "manager", "scheduler", "dispatcher", "training")


def module_files(root: Path, packages=PACKAGES) -> dict[str, Path]:
    files = {}
    for pkg in packages:
        for p in sorted((root / pkg).rglob("*.py")):
            rel = p.relative_to(root)
            if "gen" in rel.parts:
                continue
            parts = list(rel.with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join(parts)] = p
    return files


def import_graph(root: Path, packages=PACKAGES) -> dict[str, set[str]]:
    """module -> the project modules it imports (anywhere in the file)."""
    files = module_files(root, packages)
    edges: dict[str, set[str]] = {m: set() for m in files}
    for m, p in files.items():
        base = m.split(".") if p.name == "__init__.py" else m.split(".")[:-1]
        for node in ast.walk(ast.parse(p.read_text(), filename=str(p))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    b = base[: len(base) - (node.level - 1)]
                    mod = ".".join(b + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                names = [mod] + [f"{mod}.{a.name}" for a in node.names]   # `from pkg import mod` names pkg.mod
            else:
                continue
            for n in names:
                while n and n not in files:      # `from pkg.mod import func` -> pkg.mod
                    n = n.rpartition(".")[0]
                if n and n != m and files[n].name != "__init__.py":
                    edges[m].add(n)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
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
    return found


def test_no_import_cycles():
    edges = import_graph(ROOT)
    assert len(edges) > 40                      # the packages were found
    found = cycles(edges)
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_check_finds_a_cycle_through_a_function_level_import(tmp_path):
    (tmp_path / "vbert").mkdir()
    (tmp_path / "vbert" / "__init__.py").write_text("from .a import x\nfrom .b import y\n")
    (tmp_path / "vbert" / "a.py").write_text("from . import b\nx = 1\n")
    (tmp_path / "vbert" / "b.py").write_text("def y():\n    from .c import z\n")
    (tmp_path / "vbert" / "c.py").write_text("import vbert.a\nz = 2\n")
    (tmp_path / "vbert" / "d.py").write_text("from vbert.a import x\n")          # imports, not part of the cycle
    assert cycles(import_graph(tmp_path, ("vbert",))) == [["vbert.a", "vbert.b", "vbert.c"]]
    (tmp_path / "vbert" / "c.py").write_text("z = 2\n")
    assert cycles(import_graph(tmp_path, ("vbert",))) == []
