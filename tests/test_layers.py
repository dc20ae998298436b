"""The package's layering, enforced: Ray only in ``raysys/distributed``, no import cycles, and the light
commands (``--help``, ``fn-sim``, ``report --help``) never load Ray."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

PACKAGE = REPO / "raysys"
# Each layer may import only the layers before it (and itself).
LAYERS = ["errors", "storage", "data", "models", "methods", "config", "eval", "reporting", "distributed", "cli"]


def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
            for p in PACKAGE.rglob("*.py")}


def _raysys_imports(path: Path, modules: dict) -> set[str]:
    """Package modules this file imports, at top level or inside functions (``from raysys.x import y``
    counts ``raysys.x.y`` when that is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("raysys")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("raysys"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules}
    return {m for m in found if m in modules}


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 else -1


def test_each_layer_imports_only_layers_below_it():
    modules = _modules()
    upward = [(m, dep) for m, p in modules.items() if m != "raysys"
              for dep in _raysys_imports(p, modules) if dep != "raysys" and _layer(dep) > _layer(m)]
    assert not upward, f"imports of a higher layer: {upward}"


def test_no_import_cycles():
    modules = _modules()
    graph = {m: _raysys_imports(p, modules) - {m} for m, p in modules.items()}
    # A package's __init__ re-exporting its own modules is not a cycle of the modules themselves.
    graph = {m: {d for d in deps if not m.startswith(d + ".") and not d.startswith(m + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_ray_is_imported_only_in_the_distributed_layer():
    for m, p in _modules().items():
        if m.startswith("raysys.distributed"):
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n == "ray" or n.startswith("ray.") for n in names), f"{m} imports Ray"


def _loads_ray(code: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print(sorted(m for m in sys.modules "
                          "if m == 'ray' or m.startswith('ray.')))"], capture_output=True, text=True, check=True)
    return eval(out.stdout.strip().splitlines()[-1])


def test_modules_outside_the_distributed_layer_import_without_ray():
    light = sorted(m for m in _modules() if not m.startswith("raysys.distributed"))
    assert _loads_ray("; ".join(f"import {m}" for m in light)) == []


@pytest.mark.parametrize("argv", [["--help"], ["report", "--help"], ["fn-sim", "--classes", "10"]])
def test_light_commands_do_not_load_ray(argv):
    code = (f"import sys; sys.argv = ['raysys', *{argv!r}]\nfrom raysys.cli import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass")
    assert _loads_ray(code) == []


def test_functions_and_experiment_scripts_stay_small():
    """No function in the package over 60 lines (docstring included); experiment scripts only declare."""
    long = [(str(p.relative_to(PACKAGE.parent)), n.name, n.end_lineno - n.lineno + 1)
            for p in PACKAGE.rglob("*.py") for n in ast.walk(ast.parse(p.read_text()))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 60]
    assert not long, long
    scripts = {p.name: len(p.read_text().splitlines()) for p in (PACKAGE.parent / "experiments").glob("*.py")}
    assert all(n <= 60 for n in scripts.values()), scripts
    assert len([p for p in PACKAGE.glob("*.py")]) <= 6, "keep the package's top level to its few shared modules"
