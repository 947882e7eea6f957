"""The package layering (README "Layout"): imports go one way, no cycle, even inside functions.

Read from the source with ``ast`` (nothing imported), so a cycle hidden in a function body counts.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "msl_rec"

# lowest first: a module may import its own package or a lower layer, never a higher one
LAYERS = [
    {"msl_rec", "msl_rec.utils", "msl_rec.metrics", "msl_rec.significance"},
    {"msl_rec.data"},
    {"msl_rec.losses"},
    {"msl_rec.models"},
    {"msl_rec.decoding"},
    {"msl_rec.evaluation"},
    {"msl_rec.training"},
    {"msl_rec.train", "msl_rec.eval", "msl_rec.stats", "msl_rec.preprocess"},
]
# imports that may sit inside a function: optional dependencies, installed only where used
OPTIONAL = ("wandb", "optuna", "matplotlib", "sqlalchemy", "bitsandbytes")
EVAL_APP_MAX_LINES = 150


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path) -> list[tuple[str, int, bool]]:
    """``(imported module, line, inside a function)`` for every import statement of a module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue  # type-only imports never run
            if isinstance(child, ast.Import):
                out.extend((a.name, child.lineno, inside) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    pkg = name.split(".")[: -child.level + (1 if path.name == "__init__.py" else 0)] or [name]
                    base = ".".join(pkg + ([child.module] if child.module else []))
                out.append((base, child.lineno, inside))
                out.extend((f"{base}.{a.name}", child.lineno, inside) for a in child.names)
            visit(child, inside)

    visit(tree, False)
    return out


def _package(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def _layer(module: str) -> int:
    pkg = _package(module)
    for i, layer in enumerate(LAYERS):
        if pkg in layer:
            return i
    raise AssertionError(f"{module}: package {pkg} is in no layer of tests/test_architecture.py::LAYERS")


MODULES = _modules()
EDGES = {name: sorted({(m, line) for m, line, _ in _imports(name, path) if m in MODULES and m != name})
         for name, path in MODULES.items()}


def test_every_package_has_a_layer():
    for name in MODULES:
        _layer(name)


def test_imports_go_down_the_layers():
    wrong = [f"{name}:{line} imports {m} (layer {_layer(m)} > {_layer(name)})"
             for name, edges in EDGES.items() for m, line in edges
             if _layer(m) > _layer(name) and not (name == "msl_rec" and m.startswith("msl_rec."))]
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_no_import_cycle_between_modules():
    graph = {n: {m for m, _ in e} for n, e in EDGES.items()}
    # a module importing its own package's __init__ (or a parent) is not a cycle of ideas: drop parent edges
    graph = {n: {m for m in ms if not n.startswith(m + ".")} for n, ms in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                cycle = dfs(m)
                if cycle:
                    return cycle
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            cycle = dfs(n)
            assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_decoding_does_not_reach_into_models():
    offenders = [f"{n}:{line} imports {m}" for n, e in EDGES.items() if _package(n) == "msl_rec.decoding"
                 for m, line in e if _package(m) == "msl_rec.models"]
    assert not offenders, offenders


def test_imports_inside_functions_are_optional_dependencies_only():
    inside = {}  # (module, line) -> imported module; `from a import b` is listed as a and a.b: once
    for name, path in MODULES.items():
        for m, line, in_function in _imports(name, path):
            if in_function and not any(m == o or m.startswith(o + ".") for o in OPTIONAL):
                inside.setdefault((name, line), m)
    inside = [f"{name}:{line} imports {m} inside a function" for (name, line), m in sorted(inside.items())]
    assert not inside, "move these imports to the module top (only optional dependencies may be lazy):\n" + \
        "\n".join(inside)


def test_eval_app_is_thin():
    lines = len((ROOT / "eval.py").read_text(encoding="utf-8").splitlines())
    assert lines < EVAL_APP_MAX_LINES, f"msl_rec/eval.py has {lines} lines; keep the app under {EVAL_APP_MAX_LINES}"
