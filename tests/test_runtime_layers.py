"""The runtime's imports, lazy ones included: nothing from the data stages, the deployment stages or the
demo, and neither the config nor the experiment folder, directly or through the runtime's and common's
modules it imports. (src.models and src.metrics, the layers it may use, answer for their own imports.)"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
FORBIDDEN = ("src.etl", "src.dl", "src.demo", "src.common.config", "src.common.experiment")
FOLLOWED = ("src.runtime", "src.common")  # whose imports are followed further


def module_path(module: str) -> Path | None:
    """The file of a module of src (a package's __init__.py), None for anything else."""
    relative = Path(*module.split(".")[1:]) if module.startswith("src.") else None
    if relative is None:
        return None
    for candidate in (SRC / relative.with_suffix(".py"), SRC / relative / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imports_of(path: Path) -> set[str]:
    """Every src module a file imports, at any depth of the file (`from pkg import mod` is pkg.mod)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if module_path(f"{node.module}.{a.name}")}
    return {name for name in found if name == "src" or name.startswith("src.")}


def reached_from(start: list[str]) -> dict[str, str]:
    """Every src module reachable from `start` -> the module that first imported it."""
    seen = {name: "" for name in start}
    queue = list(start)
    while queue:
        module = queue.pop()
        path = module_path(module) if is_in(module, FOLLOWED) else None
        for imported in imports_of(path) if path else ():
            parts = imported.split(".")
            for depth in range(2, len(parts) + 1):  # importing a.b.c runs a.b's __init__ too
                parent = ".".join(parts[:depth])
                if parent not in seen:
                    seen[parent] = module
                    queue.append(parent)
    return seen


def is_in(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def runtime_modules() -> list[str]:
    return sorted(
        "src." + ".".join(p.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
        for p in (SRC / "runtime").rglob("*.py")
    )


def test_runtime_reaches_no_stage_config_or_experiment():
    reached = reached_from(runtime_modules())
    bad = {module: via for module, via in reached.items() if is_in(module, FORBIDDEN)}
    assert not bad, "the runtime reaches " + ", ".join(
        f"{m} (imported by {via})" for m, via in sorted(bad.items())
    )


def test_the_check_sees_lazy_imports(tmp_path, monkeypatch):
    """A function-level import of a stage inside the runtime is found (on a copy of the tree)."""
    fake = tmp_path / "src"
    (fake / "runtime").mkdir(parents=True)
    (fake / "runtime" / "__init__.py").write_text("")
    (fake / "runtime" / "late.py").write_text("def f():\n    from src.common import experiment\n")
    (fake / "common").mkdir()
    (fake / "common" / "__init__.py").write_text("")
    (fake / "common" / "experiment.py").write_text("")
    monkeypatch.setattr(sys.modules[__name__], "SRC", fake)
    assert "src.common.experiment" in reached_from(runtime_modules())
