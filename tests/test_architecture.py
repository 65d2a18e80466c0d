"""The package keeps its architecture (ARCHITECTURE.md): small modules and functions, a math core
that imports only torch, numpy and the standard library, imports that run down the layers only,
and a top level that imports nothing heavy."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "itdiffusion"
MAX_MODULE_LINES = 450
MAX_FUNCTION_CODE_LINES = 50

# A module may import from its own layer and the layers before it (ARCHITECTURE.md).
LAYERS = [
    {"fileio", "tables"},  # leaf utilities: stdlib and numpy only, usable from every layer
    {"core"},
    {"denoisers"},
    {"objective", "tuning", "model", "protocols", "results", "evalstate", "evaluation", "metrics", "conditional",
     "infomap"},
    {"baselines"},
    {"training", "data", "reporting"},
    {"resolve", "demo", "demo_conditional", "guard", "cli"},
]
LAYER_OF = {unit: i for i, units in enumerate(LAYERS) for unit in units}
ALLOWED_IN_CORE = {"torch", "numpy"} | set(sys.stdlib_module_names)


def modules():
    return sorted(p for p in SRC.rglob("*.py"))


def unit(path: Path) -> str:
    """The top-level unit of a module: ``core`` for ``core/grid.py``, ``model`` for ``model.py``."""
    rel = path.relative_to(SRC)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def internal_imports(path: Path) -> list[tuple[int, str]]:
    """(line, unit) of every import of this package's modules from ``path`` (also inside functions)."""
    package = list(path.relative_to(SRC).parent.parts)
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1]
            target = base + (node.module.split(".") if node.module else [])
            names = [target] if node.module else [target + [a.name] for a in node.names]
            out += [(node.lineno, t[0]) for t in names if t]
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for name in ([node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]):
                parts = (name or "").split(".")
                if parts[0] == "itdiffusion" and len(parts) > 1:
                    out.append((node.lineno, parts[1]))
    return out


def external_imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name.split(".")[0]) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            out.append((node.lineno, node.module.split(".")[0]))
    return out


def code_lines(node, lines: list[str]) -> int:
    """Lines of a function that are not blank, comments or its docstring (as tools/fnlen.py counts)."""
    skip = set()
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        skip.update(range(body[0].lineno, body[0].end_lineno + 1))
    count = 0
    for ln in range(node.lineno, node.end_lineno + 1):
        text = lines[ln - 1].strip()
        if ln not in skip and text and not text.startswith("#"):
            count += 1
    return count


def test_no_module_over_450_lines():
    long = {str(p.relative_to(SRC)): n for p in modules() if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_no_function_over_50_code_lines():
    long = []
    for path in modules():
        text = path.read_text()
        lines = text.splitlines()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = code_lines(node, lines)
                if n > MAX_FUNCTION_CODE_LINES:
                    long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({n})")
    assert not long, f"functions over {MAX_FUNCTION_CODE_LINES} code lines: {long}"


def test_core_imports_only_torch_numpy_stdlib_and_leaf_utilities():
    bad = []
    for path in sorted((SRC / "core").rglob("*.py")):
        bad += [f"{path.name}:{ln} {name}" for ln, name in external_imports(path) if name not in ALLOWED_IN_CORE]
        bad += [f"{path.name}:{ln} itdiffusion.{u}" for ln, u in internal_imports(path) if LAYER_OF.get(u, 99) > 1]
    for leaf in sorted(LAYERS[0]):
        path = SRC / f"{leaf}.py"
        bad += [f"{leaf}.py:{ln} {name}" for ln, name in external_imports(path) if name not in ALLOWED_IN_CORE]
        bad += [f"{leaf}.py:{ln} itdiffusion.{u}" for ln, u in internal_imports(path)]
    assert not bad, f"the math core and leaf utilities import only torch, numpy and the stdlib: {bad}"


def test_every_module_has_a_layer():
    units = {unit(p) for p in modules()} - {"__init__"}
    assert units <= set(LAYER_OF), f"modules missing from LAYERS (add them to ARCHITECTURE.md too): {units - set(LAYER_OF)}"


def test_imports_run_down_the_layers():
    up = []
    for path in modules():
        own = unit(path)
        if own == "__init__":
            continue
        for ln, target in internal_imports(path):
            if target != own and target in LAYER_OF and LAYER_OF[target] > LAYER_OF[own]:
                up.append(f"{path.relative_to(SRC)}:{ln} imports {target} (layer {LAYER_OF[target]} > {LAYER_OF[own]})")
    assert not up, f"imports from a later layer: {up}"


def test_architecture_md_lists_the_layers_and_stays_short():
    text = (SRC.parents[1] / "ARCHITECTURE.md").read_text()
    assert len(text.splitlines()) < 120
    for units in LAYERS:
        for name in units:
            assert f"`{name}" in text, f"ARCHITECTURE.md does not mention {name}"


@pytest.mark.parametrize("heavy", ["diffusers", "matplotlib", "scipy", "itdiffusion.baselines",
                                   "itdiffusion.model", "torch"])
def test_import_itdiffusion_is_cheap(heavy):
    code = f"import sys, itdiffusion; assert {heavy!r} not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, env={"PYTHONPATH": str(SRC.parent)})


def test_public_names_resolve_lazily():
    import itdiffusion as itd

    assert set(itd.__all__) <= set(dir(itd))
    for name in itd.__all__:
        assert getattr(itd, name) is not None
    assert itd.baselines.ode_nll is not None  # sub-packages are attributes as well
    with pytest.raises(AttributeError):
        itd.no_such_name  # noqa: B018
