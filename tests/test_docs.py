"""Every document the code, the tests and the docs cite is in the repository.

A reference is a path ending in ``.md`` (or a ``*_examples.py`` script) in a Python or
Markdown file, or a relative Markdown link. A path with a folder must exist relative to
the repository root or to the citing file; a bare file name must exist somewhere in the
repository. Web addresses are not references.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_REF = re.compile(r"(?<![\w/.:-])((?:[\w.-]+/)*[\w-]+(?:\.md|_examples\.py))(?:#[\w-]*)?")
_LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")


def _tracked() -> list[Path]:
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py", "*.md"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return [ROOT / f for f in out if (ROOT / f).is_file()]


def _references(path: Path) -> set[str]:
    text = path.read_text(errors="replace")
    refs = set(_REF.findall(text))
    if path.suffix == ".md":
        refs |= {link for link in _LINK.findall(text) if "://" not in link}
    return {r for r in refs if not r.startswith(("http", "www."))}


def _exists(ref: str, citing: Path, names: set[str]) -> bool:
    if "/" not in ref:
        return ref in names
    return (ROOT / ref).exists() or (citing.parent / ref).exists()


def test_every_cited_document_is_in_the_repository():
    files = _tracked()
    names = {p.name for p in files}
    dangling = sorted(
        f"{path.relative_to(ROOT)} cites {ref}"
        for path in files
        for ref in _references(path)
        if not _exists(ref, path, names)
    )
    assert dangling == []
