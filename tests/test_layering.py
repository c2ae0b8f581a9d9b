"""The package's import layers (STYLE.md): nothing imports upward.

    errors, assets  <-  nn, checkpoint, tokenizer  <-  models  <-  data, train, infer
                    <-  eval, rl, serve, retrieval, lab  <-  cli

Imports inside functions count too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import evolm

LEVEL = {
    "errors": 0,
    "assets": 0,
    "nn": 1,
    "checkpoint": 1,
    "tokenizer": 1,
    "models": 2,
    "data": 3,
    "train": 3,
    "infer": 3,
    "eval": 4,
    "rl": 4,
    "serve": 4,
    "retrieval": 4,
    "lab": 4,
    "cli": 5,
}
ROOT = Path(evolm.__file__).parent


def _imports(path: Path) -> set[str]:
    """Top-level evolm subpackages (or ``"evolm"`` itself) that ``path`` imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "evolm":
                found.add(parts[1] if len(parts) > 1 else "evolm")
    return found


def test_no_module_imports_a_higher_layer():
    back_edges = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if len(rel.parts) == 1 and rel.stem == "__init__":
            continue  # the public facade re-exports from below the CLI
        owner = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        assert owner in LEVEL, f"{rel}: package {owner!r} has no layer; add it to LEVEL in this test"
        for target in _imports(path):
            if target == "evolm":
                if owner != "cli":
                    back_edges.append(f"{rel} imports the evolm facade (only the CLI may)")
            elif LEVEL.get(target, 99) > LEVEL[owner]:
                back_edges.append(f"{rel} ({owner}, layer {LEVEL[owner]}) imports {target} (layer {LEVEL.get(target)})")
    assert not back_edges, "\n".join(back_edges)
