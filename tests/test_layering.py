"""The layers by folder: service -> workers -> trainers.contract, and only the training
process loads torch.

- ``service/`` and ``workers/`` import nothing of ``trainers`` but ``trainers/contract/``
  (at the top of a module or inside a function: both count);
- ``trainers/contract/`` imports nothing of ``trainers`` outside itself;
- ``trainers/`` never imports ``service`` or ``workers``, and ``workers/`` never ``service``;
- every contract module, the API and the Celery task's lazily loaded supervisor import in
  a fresh interpreter without torch, transformers, trl or datasets;
- no production file imports another that imports it back (no import circle).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from bench.structure import circles, graph

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "trl", "datasets")


def _modules(folder: str) -> list[str]:
    out = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return out


def _imported(path: Path) -> set[str]:
    """Every module name ``path`` imports, at any depth of the file (absolute imports)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def _offenders(folder: str, allowed) -> list[str]:
    return sorted(
        f"{path.relative_to(ROOT)} imports {name}"
        for path in (ROOT / folder).rglob("*.py")
        for name in _imported(path)
        if not allowed(name)
    )


def _is(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


@pytest.mark.parametrize("folder", ["service", "workers"])
def test_service_and_workers_see_only_the_contract_of_trainers(folder):
    def allowed(name: str) -> bool:
        return not _is(name, "trainers") or name == "trainers" or _is(name, "trainers.contract")

    assert _offenders(folder, allowed) == []


def test_the_contract_imports_nothing_of_trainers_outside_itself():
    def allowed(name: str) -> bool:
        outside = _is(name, "trainers") and name != "trainers"
        return not (outside and not _is(name, "trainers.contract")) and not any(
            _is(name, p) for p in ("service", "workers", *HEAVY)
        )

    assert _offenders("trainers/contract", allowed) == []


def test_imports_only_go_downward():
    assert _offenders("trainers", lambda n: not (_is(n, "service") or _is(n, "workers"))) == []
    assert _offenders("workers", lambda n: not _is(n, "service")) == []


def test_service_names_no_method():
    """The API knows methods only through the contract's hooks: no method's type appears
    as a string in service/ (the demo, a client of the API, excepted)."""
    from trainers.contract.methods import METHOD_ALIASES, METHODS

    found = sorted(
        f"{path.relative_to(ROOT)}: {name}"
        for path in (ROOT / "service").rglob("*.py")
        if path.name != "demo.py"
        for name in (*METHODS, *METHOD_ALIASES)
        if f'"{name}"' in path.read_text() or f"'{name}'" in path.read_text()
    )
    assert found == []


def test_no_import_circle():
    assert circles(graph(ROOT)) == []


def test_contract_modules_the_api_and_the_supervisor_import_without_torch():
    modules = [
        *_modules("trainers/contract"),
        "service.main",
        "service.cli",
        "workers.tasks",
        "workers.supervisor",
    ]
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "    heavy = [m for m in " + repr(HEAVY) + " if m in sys.modules]\n"
        "    if heavy:\n"
        "        sys.exit(f'{name} loaded {heavy}')\n"
        "import service.main\n"
        "service.main.create_app()\n"
        "heavy = [m for m in " + repr(HEAVY) + " if m in sys.modules]\n"
        "sys.exit(f'create_app loaded {heavy}' if heavy else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
