"""The package layout holds: no private name crosses a package boundary.

(The layering and the absence of import cycles are import-linter contracts in pyproject.toml,
checked by `lint-imports` in .ci/run.)
"""

from __future__ import annotations

import ast
from pathlib import Path

import fastblt

ROOT = Path(fastblt.__file__).resolve().parent


def _package(module: str) -> str:
    """fastblt.runtime.state -> fastblt.runtime; fastblt.errors -> fastblt.errors."""
    return ".".join(module.split(".")[:2])


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def private_uses(path: Path) -> list[str]:
    """`from fastblt.X import _name` and `module._name` where module is another package's."""
    me = _package(_module_name(path))
    tree = ast.parse(path.read_text(), str(path))
    found, foreign = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fastblt"):
            other = _package(node.module) != me
            for alias in node.names:
                if other and alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"line {node.lineno}: from {node.module} import {alias.name}")
                target = f"{node.module}.{alias.name}"
                if _package(target) != me:
                    foreign[alias.asname or alias.name] = target
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("fastblt") and _package(alias.name) != me:
                    foreign[alias.asname or alias.name.split(".")[0]] = alias.name
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in foreign
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            found.append(f"line {node.lineno}: {foreign[node.value.id]}.{node.attr}")
    return found


def test_no_private_name_is_used_across_packages():
    offenders = {str(p.relative_to(ROOT.parent)): uses for p in sorted(ROOT.rglob("*.py")) if (uses := private_uses(p))}
    assert offenders == {}


def test_the_checker_sees_a_private_import(tmp_path, monkeypatch):
    fake = ROOT / "runtime" / "_layout_probe.py"  # parsed only, never written: read_text is patched
    source = "from fastblt.validate.hf import _quiet\nfrom fastblt.runtime.state import _write\n"
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: source)
    assert private_uses(fake) == ["line 1: from fastblt.validate.hf import _quiet"]
