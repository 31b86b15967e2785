"""The package's shape: no import cycles (lazy imports included), small modules, light commands."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "gravity_sparse"
MAX_LINES = 400  # outside kernels/
HEAVY = ("peft", "dimod", "neal", "dwave", "transformers.trainer")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every gravity_sparse module `path` imports, at the top or inside a function."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from pkg import submodule` imports the submodule
            targets = [f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in known]
            targets.append(module)
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    return found


def test_no_import_cycles_including_lazy_imports():
    modules = _modules()
    known = set(modules)
    graph = {name: _imports(name, path, known) for name, path in modules.items()}
    # a package's __init__ importing its own submodules is how packages work, not a cycle
    for name in graph:
        graph[name] = {t for t in graph[name] if not name.startswith(t + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_modules_outside_kernels_are_small():
    big = {
        name: n
        for name, path in _modules().items()
        if ".kernels" not in name and (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not big, f"modules over {MAX_LINES} lines: {big}"


def test_modeling_files_are_self_contained():
    """They are copied into every checkpoint: only torch, transformers and each other."""
    from gravity_sparse.model.io import SOURCE_FILES

    siblings = {Path(n).stem for n in SOURCE_FILES}
    for name in SOURCE_FILES:
        tree = ast.parse((PACKAGE / "model" / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    assert node.module in siblings, f"{name}: from .{node.module}"
                    continue
                roots = [(node.module or "").split(".")[0]]
            else:
                continue
            allowed = {"torch", "transformers", "huggingface_hub", "__future__"}
            allowed |= {"inspect", "sys", "collections", "typing", "math", "dataclasses"}
            allowed |= {"itertools", "weakref", "threading"}
            assert set(roots) <= allowed, f"{name} imports {roots}"


def test_light_commands_import_no_training_or_solver_library():
    """`--help`, `info` and `validate` in one fresh process: none of them loads peft, Trainer, dimod or
    neal (the union is checked, so each one alone does not either)."""
    code = (
        "import sys\n"
        "from gravity_sparse.cli import main\n"
        "for argv in (['--help'], ['info'], ['validate', '-c', 'pipelines/tiny.yaml']):\n"
        "    try:\n"
        "        assert main(argv) == 0, argv\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, argv\n"
        f"heavy = sorted(m for m in sys.modules if m in {HEAVY!r} or m.split('.')[0] in {HEAVY!r})\n"
        "print('HEAVY', heavy)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=PACKAGE.parent,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "HEAVY []"
