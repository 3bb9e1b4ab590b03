"""The packages form layers that import only downward (docs/architecture.md).

Every `import` / `from ... import` in src/ is read with ast, function-level imports included: a lazy import
is still a dependency.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Lowest first. A package may import its own layer and any below it, never one above.
LAYERS = [
    ("common",),
    ("etl",),
    ("models",),
    ("metrics",),
    ("runtime",),
    ("dl",),
    ("demo",),
]
RANK = {pkg: rank for rank, group in enumerate(LAYERS) for pkg in group}


def package_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "src" else None


def imported_modules(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            # `from src import x` / `from src.dl import export` name the subpackage in the alias.
            if node.module in ("src",):
                found += [(node.lineno, f"src.{alias.name}") for alias in node.names]
    return found


def upward_imports() -> list[str]:
    problems = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        if len(rel.parts) < 2:
            continue  # src/__init__.py
        own = rel.parts[0]
        for line, module in imported_modules(path):
            target = package_of(module)
            if target is None or target == own:
                continue
            if target not in RANK:
                problems.append(f"src/{rel}:{line} imports {module}: package {target!r} has no layer")
            elif RANK[target] > RANK[own]:
                problems.append(f"src/{rel}:{line} ({own}) imports {module} ({target}, a higher layer)")
    return problems


def test_every_package_has_a_layer():
    packages = {p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages <= set(RANK), f"packages without a layer: {sorted(packages - set(RANK))}"


def test_no_package_imports_a_higher_layer():
    problems = upward_imports()
    assert not problems, "upward imports:\n" + "\n".join(problems)


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    """The walker itself: a planted runtime -> dl import is reported."""
    fake = tmp_path / "src"
    (fake / "runtime").mkdir(parents=True)
    (fake / "runtime" / "bad.py").write_text("def f():\n    from src.dl.train import run\n")
    monkeypatch.setattr(sys.modules[__name__], "SRC", fake)
    problems = upward_imports()
    assert len(problems) == 1 and "src/runtime/bad.py:2" in problems[0]


@pytest.mark.parametrize("module", ["src.dl.train", "src.metrics.validator", "src.runtime"])
def test_moved_modules_import(module):
    __import__(module)
