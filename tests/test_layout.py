"""The package's layering, read from the source: the library never imports an entry point."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "compatembed"
ENTRY_POINTS = ("train", "extract", "evaluate", "report", "demo")
"""The command-line shells (``compatembed/<name>.py``): Hydra or argparse over library functions."""


def imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) of every import in ``tree``, function bodies included; ``from a import b`` gives ``a`` and ``a.b``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def entry_point_imports(path: Path) -> list[str]:
    banned = {f"compatembed.{name}" for name in ENTRY_POINTS}
    tree = ast.parse(path.read_text(), filename=str(path))
    return [f"{path.relative_to(PACKAGE.parent)}:{line}: {module}" for line, module in imported_modules(tree) if module in banned]


def test_no_library_module_imports_an_entry_point():
    shells = {PACKAGE / f"{name}.py" for name in ENTRY_POINTS}
    modules = [p for p in sorted(PACKAGE.rglob("*.py")) if p not in shells]
    assert len(modules) > 40  # the scan sees the whole package
    offenders = [hit for path in modules for hit in entry_point_imports(path)]
    assert offenders == [], "library modules import entry points:\n" + "\n".join(offenders)


def test_the_scan_catches_every_import_form():
    sources = [
        "from compatembed.evaluate import evaluate_pair",
        "import compatembed.train",
        "from compatembed import report",
        "def f():\n    from compatembed.demo import run\n",
    ]
    for source in sources:
        tree = ast.parse(source)
        assert any(m.startswith("compatembed.") and m.split(".")[1] in ENTRY_POINTS for _, m in imported_modules(tree)), source
    assert "compatembed.train" not in {m for _, m in imported_modules(ast.parse("from compatembed.training.run import train"))}
