"""Architecture boundaries (in the spirit of Polygraphy's test_no_cli_deps).

- The numerics (`numerics/`) and the operator handlers (`ops/`) load no onnx, onnxruntime,
  protobuf, typer or rich: checked in a fresh interpreter, module by module.
- The library (`import onnx_tucker`, `onnx_tucker.api`) loads no CLI code (typer, rich.console).
- Statically (ast): only `cli.py` imports typer or rich.console; only `graph/` and `runtime/` (and a
  lazily importing `training/`) import onnx / onnxruntime / google.protobuf at module level, besides
  the exceptions listed below with their reasons; the sub-packages and top-level modules import each
  other without a cycle of any kind: module level, `if TYPE_CHECKING:` and function-local imports all
  count (a lazy import hides a dependency from the interpreter, not from the design).
- The handler rule (ast): nothing outside `ops/` branches on an op type (see `op_type_offences`); the
  graph layer recognises its structural ops (Constant, Identity, ...) through `graph/optypes.py` only.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "onnx_tucker"

PROTOBUF_LIBS = ("onnx", "onnxruntime", "google.protobuf", "onnx_ir")
CLI_LIBS = ("typer", "rich")
# Sub-packages allowed to import the protobuf libraries at module level.
PROTOBUF_PACKAGES = {"graph", "runtime", "training", "quantize"}  # quantize/: onnxruntime's quantizer, as runtime/ is its sessions
# Module-level protobuf imports outside those packages: (file, imported module) -> reason. Every entry
# must still exist (test below), so the list cannot silently outgrow the code.
PROTOBUF_EXCEPTIONS = {
    ("api.py", "import onnx"): "the public API accepts and returns onnx.ModelProto (ModelLike, load_pair)",
}


# ---- helpers --------------------------------------------------------------------------------------


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def module_level_imports(path: Path) -> Iterator[ast.Import | ast.ImportFrom]:
    """Imports that run when the module is imported: top level, inside try/except, with and if
    blocks, but not inside functions, classes, or `if TYPE_CHECKING:`."""

    def walk(stmts: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
        for s in stmts:
            if isinstance(s, (ast.Import, ast.ImportFrom)):
                yield s
            elif isinstance(s, ast.If):
                if "TYPE_CHECKING" not in ast.unparse(s.test):
                    yield from walk(s.body)
                yield from walk(s.orelse)
            elif isinstance(s, ast.Try):
                yield from walk(s.body)
                for h in s.handlers:
                    yield from walk(h.body)
                yield from walk(s.orelse)
                yield from walk(s.finalbody)
            elif isinstance(s, ast.With):
                yield from walk(s.body)

    yield from walk(ast.parse(path.read_text(encoding="utf-8")).body)


def all_imports(path: Path) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement anywhere in the module (lazy ones included)."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node


def imported_modules(path: Path, node: ast.Import | ast.ImportFrom) -> list[str]:
    """Absolute names a statement imports; relative imports resolved against `path`'s package. For
    `from X import a` both X and X.a are returned (a may be a submodule)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:
        package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
        parts = package.split(".")
        base = ".".join(parts[: len(parts) - (node.level - 1)])
        mod = f"{base}.{node.module}" if node.module else base
    else:
        mod = node.module or ""
    return [mod] + [f"{mod}.{a.name}" for a in node.names]


def is_under(name: str, roots: tuple[str, ...]) -> bool:
    return any(name == r or name.startswith(r + ".") for r in roots)


def loaded_in_fresh_process(module: str, forbidden: tuple[str, ...], parent_stub: bool) -> dict[str, object]:
    """Import `module` in a new interpreter and list the forbidden modules that ended up loaded.

    `parent_stub`: register a bare `onnx_tucker` package first, so that only `module` and what it
    imports itself run (not `onnx_tucker/__init__.py`, which imports the whole library)."""
    stub = (
        "import importlib.util, types\n"
        "spec = importlib.util.find_spec('onnx_tucker')\n"
        "pkg = types.ModuleType('onnx_tucker'); pkg.__path__ = list(spec.submodule_search_locations)\n"
        "pkg.__spec__ = spec; pkg.__file__ = spec.origin; sys.modules['onnx_tucker'] = pkg\n"
    )
    code = (
        "import importlib, json, sys\n"
        + (stub if parent_stub else "")
        + f"importlib.import_module({module!r})\n"
        f"forbidden = {forbidden!r}\n"
        "bad = sorted(m for m in sys.modules if any(m == f or m.startswith(f + '.') for f in forbidden))\n"
        "print(json.dumps({'bad': bad, 'file': sys.modules['onnx_tucker'].__spec__.origin}))\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(result["file"]).resolve().is_relative_to(PKG), result["file"]  # this checkout, not an install
    return result


def modules_of(subpackage: str) -> list[str]:
    return [m for m in package_modules() if m == f"onnx_tucker.{subpackage}" or m.startswith(f"onnx_tucker.{subpackage}.")]


# ---- what each import loads (fresh interpreters) ---------------------------------------------------


@pytest.mark.parametrize("module", modules_of("numerics") + modules_of("ops"))
def test_numerics_and_ops_load_no_onnx_and_no_cli_code(module: str) -> None:
    """Each module of numerics/ and ops/, with what it imports itself, loads none of onnx,
    onnxruntime, protobuf, onnx_ir, typer, rich."""
    result = loaded_in_fresh_process(module, PROTOBUF_LIBS + CLI_LIBS, parent_stub=True)
    assert result["bad"] == [], f"importing {module} loads {result['bad']}"


@pytest.mark.parametrize("module", ["onnx_tucker.numerics", "onnx_tucker.ops"])
def test_importing_numerics_or_ops_through_the_package_loads_no_onnx(module: str) -> None:
    result = loaded_in_fresh_process(module, PROTOBUF_LIBS + CLI_LIBS, parent_stub=False)
    assert result["bad"] == [], f"importing {module} loads {result['bad']}"


@pytest.mark.parametrize("module", ["onnx_tucker", "onnx_tucker.api"])
def test_library_loads_no_cli_code(module: str) -> None:
    result = loaded_in_fresh_process(module, ("typer", "rich.console"), parent_stub=False)
    assert result["bad"] == [], f"importing {module} loads {result['bad']}"


# ---- static rules (ast) -------------------------------------------------------------------------------


# The command line's own modules: the only ones that may import typer or rich.console. The library never
# imports them (test_library_loads_no_cli_code; and test_only_the_cli_imports_its_console below).
CLI_MODULES = {
    "onnx_tucker.cli": "the typer app",
    "onnx_tucker.report.console": "the terminal Console the CLI prints through (no markup or emoji in user "
    "text) and the table layout that never cuts a number at 80 columns: it measures with rich.console",
}


def library_imports_of(roots: tuple[str, ...]) -> list[str]:
    """`file:line: statement` of every import of a module under `roots` (lazy ones included) outside CLI_MODULES."""
    found = []
    for name, path in package_modules().items():
        if name in CLI_MODULES:
            continue
        for node in all_imports(path):
            if any(is_under(m, roots) for m in imported_modules(path, node)):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_only_the_cli_imports_typer_or_rich_console() -> None:
    """Anywhere in a module, lazy imports included: rendering helpers may use rich.table, never a Console."""
    assert library_imports_of(("typer", "rich.console")) == []


def test_only_the_cli_imports_its_console() -> None:
    """report/console.py is the CLI's: no library module imports it, lazily or not."""
    assert library_imports_of(("onnx_tucker.report.console",)) == []


def _protobuf_imports_outside_graph_and_runtime() -> list[tuple[str, int, str]]:
    found = []
    for path in package_modules().values():
        rel = path.relative_to(PKG)
        if len(rel.parts) > 1 and rel.parts[0] in PROTOBUF_PACKAGES:
            continue
        for node in module_level_imports(path):
            if any(is_under(m, PROTOBUF_LIBS) for m in imported_modules(path, node)):
                found.append((rel.as_posix(), node.lineno, ast.unparse(node)))
    return found


def test_protobuf_libraries_are_imported_at_module_level_only_by_graph_and_runtime() -> None:
    offenders = [
        f"onnx_tucker/{rel}:{line}: {stmt}"
        for rel, line, stmt in _protobuf_imports_outside_graph_and_runtime()
        if (rel, stmt) not in PROTOBUF_EXCEPTIONS
    ]
    assert offenders == [], "module-level onnx/onnxruntime/protobuf import outside graph/ and runtime/"


def test_every_listed_protobuf_exception_still_exists() -> None:
    present = {(rel, stmt) for rel, _, stmt in _protobuf_imports_outside_graph_and_runtime()}
    assert set(PROTOBUF_EXCEPTIONS) <= present, set(PROTOBUF_EXCEPTIONS) - present


def test_only_the_quantize_stage_imports_onnxruntimes_quantizer() -> None:
    """`onnxruntime.quantization` (issue 18) is imported by quantize/ only, lazily or not; and it is found there."""
    found = library_imports_of(("onnxruntime.quantization",))
    assert found and all(f.startswith("onnx_tucker/quantize/") for f in found), found


def test_the_library_loads_no_quantizer_until_asked() -> None:
    """`import onnx_tucker` does not load onnxruntime's quantizer (quantize/ is imported when a command asks)."""
    result = loaded_in_fresh_process("onnx_tucker", ("onnxruntime.quantization",), parent_stub=False)
    assert result["bad"] == [], result["bad"]


def unit_of(module: str) -> str:
    """The node of the architecture graph: a sub-package (graph, ops, ...) or a top-level module (api,
    cli, config, results, the package's `__init__`). A `__main__` module (`python -m onnx_tucker.training`)
    is an entry point and a node of its own: nothing imports it (test below), so it closes no cycle."""
    parts = module.split(".")
    if parts[-1] == "__main__":
        return module
    return "onnx_tucker/__init__" if len(parts) == 1 else parts[1]


def unit_import_graph(imports: Callable[[Path], Iterator[ast.Import | ast.ImportFrom]] = all_imports,
                      ) -> dict[tuple[str, str], list[str]]:
    """(importer unit, imported unit) -> where, for imports between different units: every import
    statement by default (TYPE_CHECKING and function-local ones too), or those `imports` yields."""
    modules = package_modules()
    edges: dict[tuple[str, str], list[str]] = {}
    for name, path in modules.items():
        for node in imports(path):
            names = imported_modules(path, node)
            if isinstance(node, ast.ImportFrom):  # `from pkg import submodule` imports the submodule
                targets = [n for n in names[1:] if n in modules] or names[:1]
            else:
                targets = names
            for target in targets:
                if not is_under(target, ("onnx_tucker",)):
                    continue
                while target not in modules:  # `from .ops.layer import Layer` -> onnx_tucker.ops.layer
                    target = target.rpartition(".")[0]
                a, b = unit_of(name), unit_of(target)
                if a != b:
                    edges.setdefault((a, b), []).append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return edges


def find_cycle(edges: dict[tuple[str, str], list[str]]) -> list[str] | None:
    graph: dict[str, list[str]] = {}
    for a, b in edges:
        graph.setdefault(a, []).append(b)
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(u: str) -> list[str] | None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph.get(u, [])):
            if state.get(v) == 1:
                return stack[stack.index(v):] + [v]
            if v not in state and (cycle := visit(v)):
                return cycle
        stack.pop()
        state[u] = 2
        return None

    for u in sorted(graph):
        if u not in state and (cycle := visit(u)):
            return cycle
    return None


def test_find_cycle_finds_one() -> None:
    """The cycle check below can fail: a two-unit loop and a three-unit loop are found."""
    assert find_cycle({("a", "b"): [], ("b", "a"): []}) == ["a", "b", "a"]
    assert find_cycle({("a", "b"): [], ("b", "c"): [], ("c", "a"): [], ("c", "d"): []}) == ["a", "b", "c", "a"]
    assert find_cycle({("a", "b"): [], ("a", "c"): [], ("b", "c"): []}) is None


def test_no_import_cycle_between_subpackages() -> None:
    """Any import counts: a cycle behind a TYPE_CHECKING block or a function-local import is still two
    packages that cannot be understood (or moved) one without the other."""
    edges = unit_import_graph()
    # The graph is real: the pipeline's known dependencies are found (relative imports resolved).
    assert {("planning", "ops"), ("ops", "numerics"), ("runtime", "graph"), ("api", "planning")} <= set(edges)
    cycle = find_cycle(edges)
    where = [f"{a} -> {b}: {edges[(a, b)]}" for a, b in zip(cycle, cycle[1:], strict=False)] if cycle else []
    assert cycle is None, "module-level import cycle:\n" + "\n".join(where)


def test_the_import_graph_counts_lazy_and_type_checking_imports() -> None:
    """The cycle check sees what module-level scanning misses: an import inside a function (cli.py's
    commands import the library lazily) is an edge of the graph."""
    lazy, eager = set(unit_import_graph()), set(unit_import_graph(module_level_imports))
    assert eager < lazy and ("cli", "api") in lazy - eager


def test_nothing_imports_an_entry_point() -> None:
    """`__main__` modules are nodes of their own in the cycle check: true only while nothing imports them."""
    assert [(a, b) for a, b in unit_import_graph() if b.endswith("__main__")] == []


def test_the_shared_types_are_a_leaf() -> None:
    """`types.py` (LayerTimer, LayerTiming, progress callbacks) imports nothing of the package, lazily or not."""
    assert [(a, b) for a, b in unit_import_graph() if a == "types"] == []


def test_numerics_depend_on_nothing_else_in_the_package() -> None:
    """numerics/ is the bottom layer: it imports no other part of onnx_tucker, lazily or not."""
    assert [(a, b) for a, b in unit_import_graph() if a == "numerics"] == []


# ---- the handler rule: no op-type branch outside ops/ -------------------------------------------------

# The one exception outside ops/: the graph layer's structural ops (Constant, Identity, Dropout, Reshape,
# Add, the random and quantize ops) are recognised in graph/optypes.py, which names no layer operator.
OPTYPES_MODULE = "graph/optypes.py"


def known_op_names() -> tuple[frozenset[str], frozenset[str]]:
    """(layer operators: what ops/ handles, profiles or reports; every operator name: those and ONNX's)."""
    import onnx.defs

    from onnx_tucker.ops.registry import HANDLERS, LAYER_KERNELS, REPORTED_OPS

    layer = frozenset(HANDLERS) | frozenset(LAYER_KERNELS) | frozenset(REPORTED_OPS)
    return layer, layer | {s.name for s in onnx.defs.get_all_schemas_with_history()}


def _is_op_type(e: ast.expr) -> bool:
    return (isinstance(e, ast.Attribute) and e.attr == "op_type") or (isinstance(e, ast.Name) and e.id == "op_type")


def _docstrings(tree: ast.Module) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def op_type_offences(source: str, compares_allowed: bool = False) -> list[tuple[int, str]]:
    """(line, code) of every op-type branch in `source`. An op-type branch is
    1. a comparison (==, !=, in, not in, is) with `x.op_type` (or a name `op_type`) as an operand;
    2. `x.op_type` as a subscript key, a `.get()` / `.__contains__()` argument, or `x.op_type.startswith()`
       / `.endswith()`;
    3. a comparison with an operator's name: a string literal naming an ONNX or onnx-tucker operator,
       a tuple / list / set literal of such names, or a name this module binds to a collection of them;
    4. a string literal naming a layer operator (Conv, Gemm, FusedConv, QLinearConv, ...) anywhere but a
       docstring: which nodes are layers, and what they mean, is asked of `ops.registry`.
    `compares_allowed` (graph/optypes.py): only rule 4 applies. Comparing two nodes' op types for
    identity, `(a.name, a.op_type) in {(n.name, n.op_type) ...}`, names no operator and is not a branch."""
    layer, every = known_op_names()
    tree = ast.parse(source)
    docs = _docstrings(tree)

    def names_ops(e: ast.AST | None) -> bool:
        """A literal op name, or a collection literal (dict keys, frozenset(...)) of op names only."""
        if isinstance(e, ast.Constant):
            return isinstance(e.value, str) and e.value in every
        if isinstance(e, ast.Call) and e.args and not e.keywords:  # frozenset({...}), dict.fromkeys((...), 0)
            return names_ops(e.args[0])
        items: list[ast.expr | None] = []
        if isinstance(e, (ast.Tuple, ast.List, ast.Set)):
            items = list(e.elts)
        elif isinstance(e, ast.Dict):
            items = list(e.keys)
        strings = [i for i in items if isinstance(i, ast.Constant) and isinstance(i.value, str)]
        return bool(strings) and len(strings) == len(items) and all(names_ops(i) for i in strings)

    bound = set()  # names this module binds to collections of op names
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and names_ops(node.value):
            bound |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and names_ops(node.value):
            bound.add(node.target.id)

    def is_ops(e: ast.expr) -> bool:
        return names_ops(e) or (isinstance(e, ast.Name) and e.id in bound)

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in layer and id(node) not in docs:
            found.append((node.lineno, ast.unparse(node)))
        if compares_allowed:
            continue
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            if any(_is_op_type(e) for e in operands) or any(is_ops(e) for e in operands):
                found.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, ast.Subscript) and (_is_op_type(node.slice) or isinstance(node.value, ast.Name)
                                                  and node.value.id in bound and not isinstance(node.slice, ast.Constant)):
            found.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            f = node.func
            if (f.attr in ("get", "__contains__") and any(_is_op_type(a) for a in node.args)) or (
                    f.attr in ("startswith", "endswith") and _is_op_type(f.value)):
                found.append((node.lineno, ast.unparse(node)))
    return sorted(set(found))


def test_the_op_type_check_finds_each_kind_of_branch() -> None:
    """Each rule of `op_type_offences` fires on an example, and plain code passes."""
    bad = {
        "if node.op_type == 'Relu': pass": 1,
        "x = lay.op_type in HANDLERS": 1,
        "x = SPECIAL[node.op_type]": 1,
        "x = TABLE.get(node.op_type)": 1,
        "x = node.op_type.startswith('Q')": 1,
        "op = n.op_type\nif op in ('Identity', 'Dropout'): pass": 1,
        "OPS = frozenset({'Reshape', 'Flatten'})\ny = [n for n in g if n.kind in OPS]": 1,
        "counts = {'Dropout': 0, 'Identity': 0}\ncounts[n.kind] += 1": 1,
        "kernels = ('FusedConv',)": 1,
        "make('Gemm', a, b)": 1,
    }
    for code, n in bad.items():
        assert len(op_type_offences(code)) == n, code
    ok = ["if kind == 'tucker2': pass", "x = device in ('auto', 'cpu')", "y = find_handler(node.op_type)",
          "z = (p.name, p.op_type) in nodes", "def f():\n    'A Conv or a Gemm.'\n", "w = f'{lay.op_type} layer'"]
    for code in ok:
        assert op_type_offences(code) == [], code
    assert op_type_offences("if n.op_type == 'Constant': pass", compares_allowed=True) == []
    assert len(op_type_offences("X = frozenset({'Conv'})", compares_allowed=True)) == 1


def test_no_op_type_branch_outside_ops() -> None:
    """Planning, calibration, rewriting, the runtimes ask the operator's handler (ops/); the graph layer
    recognises structural ops through graph/optypes.py, which itself names no layer operator."""
    offenders = []
    for path in package_modules().values():
        rel = path.relative_to(PKG).as_posix()
        if rel.startswith("ops/"):
            continue
        for line, code in op_type_offences(path.read_text(encoding="utf-8"), compares_allowed=rel == OPTYPES_MODULE):
            offenders.append(f"onnx_tucker/{rel}:{line}: {code}")
    assert offenders == [], "op-type branch outside ops/ (ask the handler, or graph/optypes.py):\n" + "\n".join(offenders)


def test_the_graph_layer_names_only_structural_ops() -> None:
    """graph/optypes.py's ops are no layer operators, and every `is_op(node, "Name", ...)` call in the
    package names only those."""
    from onnx_tucker.graph import optypes

    layer, every = known_op_names()
    assert optypes.STRUCTURAL_OPS and optypes.STRUCTURAL_OPS <= every and not optypes.STRUCTURAL_OPS & layer
    calls, offenders = 0, []
    for path in package_modules().values():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "is_op":
                calls += 1
                names = node.args[1:]
                if not names or not all(isinstance(a, ast.Constant) and a.value in optypes.STRUCTURAL_OPS for a in names):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert calls and offenders == []


# ---- repository hygiene -----------------------------------------------------------------------------


def test_docs_and_tools_name_no_absolute_path_of_this_machine() -> None:
    """Paths in the docs and tools are relative to the repository (shared data: ../shared/data)."""
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), *sorted((ROOT / "tools").glob("*.py"))]
    offenders = [
        f"{f.relative_to(ROOT)}:{i}: {line.strip()}"
        for f in files
        for i, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1)
        if "/work/" in line or "/home/" in line
    ]
    assert offenders == []
