"""The package's own source holds to the house rules: two layers, short functions, no repeated blocks."""
import ast
import re
import sys
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "mbmlib"
# __main__.py is the command-line entry point: it hands over to the workflow's CLI and is no part of the core.
CORE = [p for p in PACKAGE.rglob("*.py") if "workflow" not in p.relative_to(PACKAGE).parts and p.name != "__main__.py"]
ALL = sorted(PACKAGE.rglob("*.py"))
# What the core may import besides the standard library: torch, and triton in the Triton backend only.
CORE_THIRD_PARTY = {"torch"}
TRITON_BACKEND = PACKAGE / "kernels" / "triton"
MAX_FUNCTION_LINES = 60
REPEAT_LINES = 6


def imported_modules(path: Path) -> list[tuple[str, int]]:
    """(absolute module name, line) of every import in ``path``, relative imports resolved."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if path.name != "__init__.py":
        package = package.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names] if node.module is None or node.level else []
            found += [(base, node.lineno)] + [(n, node.lineno) for n in names]
    return found


def test_the_import_scanner_sees_relative_and_absolute_imports(tmp_path):
    found = {name for name, _ in imported_modules(PACKAGE / "workflow" / "train.py")}
    assert {"mbmlib.multipliers", "mbmlib.workflow.config", "torch.nn.functional", "torch"} <= found


@pytest.mark.parametrize("path", CORE, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_the_core_never_imports_the_workflow_nor_anything_but_torch(path):
    allowed = CORE_THIRD_PARTY | ({"triton"} if TRITON_BACKEND in path.parents else set())
    for name, line in imported_modules(path):
        top = name.split(".")[0]
        assert not name.startswith("mbmlib.workflow"), f"{path.name}:{line} imports {name}"
        assert top in sys.stdlib_module_names or top in allowed or top in ("mbmlib", "__future__"), \
            f"{path.name}:{line} imports {name}: the core imports torch only"


def test_import_mbmlib_stays_light():
    import subprocess

    code = ("import sys, mbmlib; print(sorted(m for m in ('pandas', 'matplotlib', 'papermill', 'yaml', 'torchvision',"
            " 'sklearn', 'mbmlib.workflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent).stdout
    assert out.strip() == "[]"


def long_functions(source: str, limit: int) -> list[str]:
    """Names (with line and length) of the functions in ``source`` longer than ``limit`` lines."""
    return [f"{node.name} (line {node.lineno}, {node.end_lineno - node.lineno + 1} lines)"
            for node in ast.walk(ast.parse(source))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > limit]


def test_long_function_finder_counts_lines():
    body = "\n".join(f"    x{i} = {i}" for i in range(61))
    assert long_functions(f"def f():\n{body}\n", 60) == ["f (line 1, 62 lines)"]
    assert long_functions("def g():\n    return 1\n", 60) == []


@pytest.mark.parametrize("path", ALL, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_function_over_60_lines(path):
    assert long_functions(path.read_text(), MAX_FUNCTION_LINES) == []


def _code_lines(path: Path) -> list[tuple[str, int]]:
    """(normalised line, line number) of the lines that carry logic: no blanks, comments, docstrings, imports,
    ``__all__`` lists."""
    tree = ast.parse(path.read_text())
    skip = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            skip.update(range(body[0].lineno, body[0].end_lineno + 1))  # docstrings
        if isinstance(node, (ast.Import, ast.ImportFrom)) or (
                isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["__all__"]):
            skip.update(range(node.lineno, node.end_lineno + 1))  # imports and export lists name, they do nothing
    out = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        text = re.sub(r"\s+", " ", line.split(" # ")[0]).strip()
        if number in skip or not text or text.startswith("#") or re.fullmatch(r"[\])},:]+", text):
            continue
        out.append((text, number))
    return out


def repeated_blocks(paths, size: int) -> list[str]:
    """Places where the same ``size`` logic lines appear twice inside the given files."""
    seen = defaultdict(list)
    for path in paths:
        lines = _code_lines(path)
        for i in range(len(lines) - size + 1):
            window = tuple(text for text, _ in lines[i:i + size])
            seen[window].append(f"{path.relative_to(PACKAGE.parent)}:{lines[i][1]}")
    return [" and ".join(places) for places in seen.values() if len(places) > 1]


def test_repeat_finder_finds_a_copied_block(tmp_path):
    block = "\n".join(f"    y = y * {i} + x" for i in range(6))
    (tmp_path / "a.py").write_text(f"def f(x, y):\n{block}\n    return y\n")
    (tmp_path / "b.py").write_text(f"def g(x, y):\n{block}\n    return -y\n")
    global PACKAGE
    saved, PACKAGE = PACKAGE, tmp_path
    try:
        assert len(repeated_blocks(sorted(tmp_path.glob("*.py")), REPEAT_LINES)) == 1
    finally:
        PACKAGE = saved


def test_no_block_of_six_lines_repeated_inside_the_package():
    assert repeated_blocks(ALL, REPEAT_LINES) == []


def test_console_script_and_package_data_point_at_what_exists():
    import importlib
    import tomllib

    project = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())
    for target in project["project"]["scripts"].values():
        module, _, name = target.partition(":")
        assert callable(getattr(importlib.import_module(module), name)), target
    for package, patterns in project["tool"]["setuptools"]["package-data"].items():
        folder = PACKAGE.parent / package.replace(".", "/")
        assert all(list(folder.glob(p)) for p in patterns), (package, patterns)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(paths) -> dict[str, set[str]]:
    """module -> the package's modules it imports (function-level imports too).

    ``from pkg import name`` points at the submodule ``pkg.name`` when there is one, else at ``pkg``; the
    parents a submodule import initialises on the way are Python's doing, not an edge.
    """
    modules = {_module_name(p) for p in paths}
    graph = {}
    for path in paths:
        edges = set()
        for name, _ in imported_modules(path):
            if name in modules:
                edges.add(name)
        # an imported name that is a submodule replaces its package as the edge
        for name in list(edges):
            if any(other.startswith(name + ".") and other in edges for other in edges):
                edges.discard(name)
        graph[_module_name(path)] = edges - {_module_name(path)}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan): each is an import circle."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_the_cycle_finder_finds_a_lazy_import_circle(tmp_path):
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_anywhere_in_the_package():
    graph = import_graph(ALL)
    assert graph["mbmlib.multipliers.specs"] >= {"mbmlib.multipliers.designs", "mbmlib.multipliers.table"}
    assert import_cycles(graph) == []
