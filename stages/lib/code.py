"""The project code a stage runs: the import closure of its module, read from the sources with `ast`.

dvc.yaml must list exactly these files as a stage's deps (tests/test_dvc_deps.py), and a training checkpoint is
resumed only by the same code (its fingerprint hashes them): one computation for both.
"""
from __future__ import annotations

import ast
import functools
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "stages"


def module_file(name: str, root: Path = ROOT) -> Path | None:
    """`stages.x.y` -> stages/x/y.py or stages/x/y/__init__.py (None if not a project module)."""
    parts = name.split(".")
    if parts[0] != PACKAGE:
        return None
    base = root.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imports_of(path: Path, root: Path = ROOT) -> set[str]:
    """Project modules imported by `path`, at any depth in the file (function-level imports count too)."""
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}  # `from stages.lib import lora` imports a module
    return {m for m in found if module_file(m, root)}


def runs_code(path: Path) -> bool:
    """False for a package __init__ that holds only a docstring: nothing there can change a result."""
    body = ast.parse(path.read_text(encoding="utf-8")).body
    return any(not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)) for n in body)


@functools.lru_cache(maxsize=None)
def closure(module: str, root: Path = ROOT) -> tuple[Path, ...]:
    """Every project file that running `python -m <module>` executes, relative to `root`, sorted."""
    todo, seen = [module], set()
    while todo:
        name = todo.pop()
        path = module_file(name, root)
        if path is None or path in seen:
            continue
        seen.add(path)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # importing a.b.c runs a and a.b too
        todo += sorted(imports_of(path, root))
    return tuple(sorted(p.relative_to(root) for p in seen if runs_code(p)))
