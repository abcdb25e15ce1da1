"""The shape of the production tree: files, import arrows, layers, circles.

Not a speed benchmark: a measure of the code's structure, read from the source with
``ast`` (nothing is imported), so two trees (two commits) can be compared the same
way::

    python -m bench.structure                  # this checkout
    python -m bench.structure --root OTHER     # another checkout, e.g. a git worktree
    python -m bench.structure --json

Rules: a production file is a ``.py`` file under ``service/``, ``workers/`` or
``trainers/``. An import arrow is one (importer, imported) pair of production files,
counted once however many names or statements carry it, whether the import sits at
the top of the module or inside a function; ``from pkg import name`` points at
``pkg/name.py`` when that file exists, else at ``pkg/__init__.py``. A package's
``__init__.py`` that only re-exports its submodules is no hop: its arrows are
followed through. Layers: the length, in files, of the longest chain of arrows once
every circle (files that import each other in a loop) is taken as one node.
"""

from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path

PACKAGES = ("service", "workers", "trainers")


def production_files(root: Path) -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (root / pkg).rglob("*.py"))


def _module_file(root: Path, dotted: str) -> Path | None:
    base = root.joinpath(*dotted.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _resolve(root: Path, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    parts = list(path.relative_to(root).with_suffix("").parts)
    base = parts[: len(parts) - node.level]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(root: Path, path: Path) -> set[Path]:
    """The production files ``path`` imports (directly, any depth of the module)."""
    out: set[Path] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = _resolve(root, path, node)
            targets = [f"{module}.{a.name}" for a in node.names] + [module]
        for dotted in targets:
            if dotted.split(".")[0] not in PACKAGES:
                continue
            found = _module_file(root, dotted)
            if found is not None and found != path:
                out.add(found)
                if isinstance(node, ast.ImportFrom) and dotted != targets[-1]:
                    break  # ``from pkg import sub``: the submodule, not pkg/__init__
    return out


def graph(root: Path) -> dict[Path, set[Path]]:
    edges = {p: imports_of(root, p) for p in production_files(root)}
    # re-export-only packages are no hop: follow their arrows through
    faces = {p for p in edges if p.name == "__init__.py" and _only_reexports(p)}
    for p, targets in edges.items():
        seen, todo = set(), list(targets)
        while todo:
            t = todo.pop()
            if t in faces and t != p:
                todo.extend(edges[t] - seen)
            seen.add(t)
        edges[p] = {t for t in seen if t not in faces or t == p}
    return {p: t for p, t in edges.items() if p not in faces}


def _only_reexports(path: Path) -> bool:
    tree = ast.parse(path.read_text())
    return all(
        isinstance(n, ast.Import | ast.ImportFrom)
        or (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))
        or (isinstance(n, ast.Assign) and all(getattr(t, "id", "") == "__all__" for t in n.targets))
        for n in tree.body
    )


def circles(edges: dict[Path, set[Path]]) -> list[list[Path]]:
    """Strongly connected components of more than one file (Tarjan)."""
    index: dict[Path, int] = {}
    low: dict[Path, int] = {}
    stack: list[Path] = []
    on: set[Path] = set()
    out: list[list[Path]] = []

    def visit(v: Path) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    return out


def layers(edges: dict[Path, set[Path]]) -> int:
    """Longest chain of arrows, in nodes, with each circle collapsed into one node."""
    node = {p: p for p in edges}
    for comp in circles(edges):
        for p in comp:
            node[p] = comp[0]
    dag: dict[Path, set[Path]] = {}
    for p, targets in edges.items():
        dag.setdefault(node[p], set()).update(node[t] for t in targets if node[t] != node[p])
    depth: dict[Path, int] = {}

    def height(v: Path) -> int:
        if v not in depth:
            depth[v] = 1 + max((height(w) for w in dag.get(v, ())), default=0)
        return depth[v]

    return max((height(v) for v in dag), default=0)


def measure(root: Path) -> dict:
    edges = graph(root)
    files = production_files(root)
    return {
        "production_files": len(files),
        "lines": sum(len(p.read_text().splitlines()) for p in files),
        "import_arrows": sum(len(t) for t in edges.values()),
        "layers": layers(edges),
        "circles": [[str(p.relative_to(root)) for p in c] for c in circles(edges)],
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    result = measure(args.root.resolve())
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            print(f"{key:>17}: {value}")
    return result


if __name__ == "__main__":
    main()
