"""Imports flow one way: flows -> tasks -> (meshops, renderers, datasets); training reads only
through datasets. A violation here is a design change, not a test to relax."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package -> facecorpus subpackages it may import (besides itself)
ALLOWED = {
    "core": set(),
    "configs": {"core"},
    "meshops": {"core"},
    "renderers": {"meshops", "core", "sheets"},
    "datasets": {"core", "sheets"},
    "tasks": {"meshops", "renderers", "datasets", "configs", "core", "sheets"},
    "training": {"datasets", "configs", "core", "sheets"},
    "flows": {"tasks", "meshops", "renderers", "datasets", "configs", "core", "sheets", "cli"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for n in names:
            parts = n.split(".")
            if parts[0] == "facecorpus" and len(parts) > 1:
                out.add(parts[1])
            elif parts[0] in ALLOWED:  # a bare `import datasets` would clash with other libraries
                out.add("BARE:" + parts[0])
    return out


@pytest.mark.parametrize("pkg", sorted(ALLOWED))
def test_imports_flow_one_way(pkg):
    bad = []
    for f in sorted((ROOT / pkg).glob("*.py")):
        for dep in _imports(f):
            if dep.startswith("BARE:") or (dep != pkg and dep not in ALLOWED[pkg]):
                bad.append(f"{f.relative_to(ROOT)} imports {dep}")
    assert not bad, "layering violations:\n" + "\n".join(bad)
