"""The notebooks' code is clean: every import used, every name defined (pyflakes over the code cells)."""
import json
from pathlib import Path

import pytest
from pyflakes import checker

REPO = Path(__file__).parent.parent
NOTEBOOKS = sorted(REPO.glob("notebooks/*.ipynb")) + sorted(REPO.glob("colab/*.ipynb"))


def notebook_code(path: Path) -> str:
    """The code cells in order, shell and magic lines (``!pip``, ``%time``) left out."""
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    lines = [line for c in cells for line in "".join(c["source"]).splitlines()
             if not line.lstrip().startswith(("!", "%"))]
    return "\n".join(lines) + "\n"


def problems(code: str, filename: str) -> list[str]:
    import ast

    found = checker.Checker(ast.parse(code), filename=filename).messages
    return [f"line {m.lineno}: {m.message % m.message_args}" for m in found]


def test_the_checker_flags_an_unused_import():
    assert problems("import os\nx = 1\n", "t") == ["line 1: 'os' imported but unused"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_code_has_no_unused_imports_or_undefined_names(path):
    assert problems(notebook_code(path), path.name) == []
