"""The layers of lc_onnx call downward only, and no modules import each other in a cycle.

Every import of every module is read with `ast`, imports inside functions included (lazy imports are
still dependencies). The layers, bottom to top (docs/architecture.md):

1. `errors` and `model/`: reading and writing models, sessions, shape inference, counting;
2. `graph/`, the pass (and `testing`, the test helpers over it);
3. calibration, bench, deploy: each uses 1-2, never another's modules;
4. the facade (`lc_onnx`, `lc_onnx.api`) and `lc_onnx.torch`;
5. commands and cli: the only place that knows flag names.

The tree shows the shape too: at most six modules at the package's top level, no function over 100 lines
nor class over 250, and test modules that import only helpers, never one another, nor edit `sys.path`.

Inside `lc_onnx.torch`, bottom to top: `blocks` (finding and collapsing blocks), `data`, `models`,
`finetune`; the package itself imports only from `blocks`, and the fine-tuning objectives never reach
one another.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lc_onnx"

LAYERS = {
    1: ["errors", "model"],
    2: ["graph", "testing"],
    3: ["calibration", "bench", "deploy"],
    4: ["__init__", "api", "torch"],
    5: ["commands", "cli"],
}
PEERS_APART = {"calibration", "bench", "deploy"}  # layer 3: none imports another


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def top(module: str) -> str:
    """The first name below `lc_onnx` ("__init__" for the package itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def layer(module: str) -> int:
    return next(n for n, tops in LAYERS.items() if top(module) in tops)


def imports(module: str) -> set[str]:
    """The lc_onnx modules `module` imports, anywhere in its body."""
    tree = ast.parse(MODULES[module].read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importing module's package
                package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{base}" if base else package
            names = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names
            ]
        else:
            continue
        found.update(name for name in names if name == "lc_onnx" or name.startswith("lc_onnx."))
    return {name for name in found if name in MODULES and name != module}


GRAPH = {module: imports(module) for module in MODULES}


def test_every_module_has_a_layer():
    assert [m for m in MODULES if not any(top(m) in tops for tops in LAYERS.values())] == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module):
    upward = sorted(dep for dep in GRAPH[module] if layer(dep) > layer(module))
    assert upward == [], f"{module} (layer {layer(module)}) imports upward"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if top(m) in PEERS_APART))
def test_calibration_bench_and_deploy_stay_apart(module):
    others = sorted(dep for dep in GRAPH[module] if top(dep) in PEERS_APART - {top(module)})
    assert others == []


def test_the_pass_never_names_calibration():
    for module in (m for m in MODULES if layer(m) <= 2):
        assert "calibration" not in {top(dep) for dep in GRAPH[module]}, module


def test_no_import_cycles():
    # Tarjan's strongly connected components; any component of two or more modules is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in GRAPH:
        if module not in index:
            visit(module)
    assert cycles == []


def test_only_the_session_factory_opens_onnxruntime_sessions():
    openers = sorted(m for m, path in MODULES.items() if "InferenceSession(" in path.read_text())
    assert openers == ["lc_onnx.model.runtime"]


def test_no_graphsurgeon_private_attributes():
    private = sorted(
        m for m, path in MODULES.items() if "._values" in path.read_text() or "LazyValues" in path.read_text()
    )
    assert private == []


# Inside lc_onnx.torch: subpackages bottom to top; the package itself (the public API) sits on `blocks`.
TORCH = "lc_onnx.torch"
TORCH_LAYERS = {"blocks": 1, "data": 2, "models": 3, "finetune": 4}
TORCH_MODULES = sorted(m for m in MODULES if m.startswith(f"{TORCH}."))
# The objectives and the baseline: each imports `config` and the shared pieces, never another of these.
OBJECTIVES = {f"{TORCH}.finetune.labels", f"{TORCH}.finetune.distill", f"{TORCH}.finetune.kd_baseline"}


def torch_layer(module: str) -> int:
    """The layer of a module below `lc_onnx.torch`: its subpackage's."""
    return TORCH_LAYERS[module.split(".")[2]]


def reached(module: str) -> set[str]:
    """Every module `module` imports, directly or through others."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        for dep in GRAPH[todo.pop()] - seen:
            seen.add(dep)
            todo.append(dep)
    return seen - {module}


def test_every_torch_module_is_in_a_subpackage():
    assert [m for m in TORCH_MODULES if m.split(".")[2] not in TORCH_LAYERS] == []
    assert sorted(OBJECTIVES - set(TORCH_MODULES)) == []


@pytest.mark.parametrize("module", TORCH_MODULES)
def test_torch_subpackages_import_down_only(module):
    torch_deps = {dep for dep in GRAPH[module] if dep == TORCH or dep.startswith(f"{TORCH}.")}
    assert TORCH not in torch_deps, f"{module} imports the {TORCH} package, which sits on top of it"
    upward = sorted(dep for dep in torch_deps - {TORCH} if torch_layer(dep) > torch_layer(module))
    assert upward == [], f"{module} ({module.split('.')[2]}) imports upward"


def test_the_torch_package_imports_only_from_blocks():
    blocks = TORCH_LAYERS["blocks"]
    outside = sorted(
        dep for dep in GRAPH[TORCH] if not dep.startswith(f"{TORCH}.") or torch_layer(dep) != blocks
    )
    assert outside == []


@pytest.mark.parametrize("module", sorted(OBJECTIVES))
def test_objectives_never_import_one_another(module):
    assert sorted(GRAPH[module] & OBJECTIVES) == [], "directly"
    assert sorted(reached(module) & OBJECTIVES) == [], "through another module"


TESTS = PACKAGE.parent / "tests"
TEST_MODULES = sorted(TESTS.rglob("test_*.py"))
MAX_FUNCTION_LINES = 100  # nested functions included
MAX_CLASS_LINES = 250


def test_the_package_top_level_keeps_at_most_six_files():
    assert len([p.name for p in PACKAGE.glob("*.py")]) <= 6, sorted(p.name for p in PACKAGE.glob("*.py"))


@pytest.mark.parametrize("path", TEST_MODULES, ids=lambda p: str(p.relative_to(TESTS)))
def test_test_modules_never_import_one_another_nor_touch_sys_path(path):
    tree = ast.parse(path.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            imported |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
    assert (
        sorted(m for m in imported if m.startswith("tests.") and m.rpartition(".")[2].startswith("test_"))
        == []
    )
    touches_path = [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and node.attr == "path"
        and getattr(node.value, "id", None) == "sys"
    ]
    assert touches_path == []


def _units(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield node, node.end_lineno - node.lineno + 1


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_long_functions_or_classes(module):
    long = [
        f"{node.name} ({lines} lines)"
        for node, lines in _units(ast.parse(MODULES[module].read_text()))
        if lines > (MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else MAX_FUNCTION_LINES)
    ]
    assert long == []
