"""The package's structure: its layers import only downward (import-linter's contracts in
pyproject.toml), the run path never imports the benchmarks, no module imports another's private
name, and every module says in its first line what it is."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import runner

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = Path(runner.__file__).parent  # the installed namespace: runner.tasks, runner.models...


def modules():
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_layers_import_only_downward():
    """``lint-imports`` (import-linter) keeps every contract; a wrong-way import, at module
    level or inside a function, breaks one."""
    lint = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(lint), str(ROOT / "pyproject.toml")], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "BROKEN" not in proc.stdout and "Contracts: 2 kept, 0 broken" in proc.stdout


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_says_what_it_is_and_imports_no_private_name(path):
    tree = ast.parse(path.read_text())
    if path.name != "__init__.py" or path.stat().st_size:
        doc = ast.get_docstring(tree)
        assert doc and doc.splitlines()[0].strip(), f"{path}: no first docstring line"
    private = [f"{node.module}.{alias.name}" for node in ast.walk(tree)
               if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("runner")
               for alias in node.names if alias.name.startswith("_")]
    assert not private, f"{path} imports private names {private}"
