"""The package's shape: the op layer is a leaf, imports form no circle, only optional heavy dependencies are imported
inside functions, and no module grows past the size at which it is doing two jobs."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lit_accel"
MAX_LINES = 800
# Imported inside functions on purpose: slow to import or optional, and only the paths that need them reach there.
DEFERRABLE = {"deepspeed", "wandb", "peft", "datasets", "pyarrow", "triton"}
# What the leaf op layer may import besides the standard library and itself.
OP_LAYER_ALLOWED = {"torch", "triton", "numpy"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(path: Path, *, top_level: bool) -> list[tuple[str, int]]:
    """(module imported, line) for the imports at module level (``top_level``) or inside functions."""
    tree = ast.parse(path.read_text())
    found: list[tuple[str, int]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import) and in_function != top_level:
                found.extend((a.name, child.lineno) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and in_function != top_level and child.module and not child.level:
                found.extend((f"{child.module}.{a.name}", child.lineno) for a in child.names)
            # `if TYPE_CHECKING:` blocks import nothing at run time.
            if isinstance(child, ast.If) and ast.unparse(child.test).endswith("TYPE_CHECKING"):
                continue
            visit(child, inside)

    visit(tree, False)
    return found


def _internal_target(name: str, modules: dict[str, Path]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def test_op_layer_is_a_leaf() -> None:
    modules = _modules()
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    for name, path in modules.items():
        if not name.startswith("lit_accel.ops"):
            continue
        for imported, line in _imports(path, top_level=True) + _imports(path, top_level=False):
            root = imported.split(".")[0]
            ok = root in stdlib or root in OP_LAYER_ALLOWED or imported.startswith("lit_accel.ops")
            assert ok, f"{path.name}:{line} imports {imported}: the op layer imports torch/triton only"


def test_no_import_circles() -> None:
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for imported, _ in _imports(path, top_level=True):
            target = _internal_target(imported, modules)
            # A package's __init__ importing its own submodules is how it re-exports them, not a circle.
            if target and target != name and not target.startswith(name + "."):
                graph[name].add(target)
    for name in list(graph):
        # A submodule reaching its parent package reaches that package's __init__ and through it its siblings;
        # only edges between distinct files count, which the package nodes above already are.
        graph[name] = {t for t in graph[name] if not name.startswith(t + ".")}

    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = [*stack[stack.index(nxt) :], nxt]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                dfs(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            dfs(name)


def test_imports_inside_functions_only_defer_optional_dependencies() -> None:
    for path in _modules().values():
        for imported, line in _imports(path, top_level=False):
            root = imported.split(".")[0]
            assert root in DEFERRABLE, (
                f"{path.relative_to(PACKAGE.parent)}:{line} imports {imported} inside a function; import it at the "
                f"top (only {sorted(DEFERRABLE)} are deferred, each with a comment saying why)"
            )


def test_no_module_is_doing_two_jobs() -> None:
    for path in _modules().values():
        n = len(path.read_text().splitlines())
        assert n <= MAX_LINES, f"{path.relative_to(PACKAGE.parent)} has {n} lines (> {MAX_LINES}): split it by job"


# Floors, lowest first: a module imports from its own floor or below. The one deliberate exception is CausalLM
# applying the fused kernels by default (models -> kernels), documented where it is imported.
FLOORS = [
    ("lit_accel.ops",),
    ("lit_accel.strategies", "lit_accel.checkpoint", "lit_accel.checkpoint_io", "lit_accel.resume",
     "lit_accel.run_identity", "lit_accel.settings"),
    ("lit_accel.models", "lit_accel.data"),
    ("lit_accel.kernels", "lit_accel.observe", "lit_accel.dropbp", "lit_accel.sparsity", "lit_accel.pruning",
     "lit_accel.lowrank"),
    ("lit_accel.callbacks", "lit_accel.export"),
    ("lit_accel.cli", "lit_accel"),
]  # fmt: skip
UPWARD_ALLOWED = {("lit_accel.models.causal_lm", "lit_accel.kernels.apply")}


def _floor(name: str) -> int:
    best = (-1, len(FLOORS))
    for i, prefixes in enumerate(FLOORS):
        for p in prefixes:
            if (name == p or name.startswith(p + ".")) and len(p) > best[0]:
                best = (len(p), i)
    return best[1]


def test_data_flows_down() -> None:
    modules = _modules()
    for name, path in modules.items():
        for imported, line in _imports(path, top_level=True):
            target = _internal_target(imported, modules)
            if target is None or (name, target) in UPWARD_ALLOWED:
                continue
            assert _floor(target) <= _floor(name), (
                f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}, a floor above it"
            )


def test_every_package_imports_first_in_a_fresh_process() -> None:
    # An import circle only shows when its far end is imported first (`import lit_accel.kernels` once failed so).
    import subprocess

    from _helpers import REPO

    packages = sorted("lit_accel." + p.name for p in (REPO / "lit_accel").iterdir() if (p / "__init__.py").is_file())
    code = "import importlib, sys; importlib.import_module(sys.argv[1])"
    failed = [
        name
        for name in packages
        if subprocess.run([sys.executable, "-c", code, name], capture_output=True, cwd=REPO).returncode != 0
    ]
    assert packages and not failed, failed
