"""The sans-I/O core owns no socket, clock, event loop or logger (read with ``ast``, not run)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "securemsg"
# client_types: the application's value types, which the client's decoder makes directly.
CORE = [
    "frames",
    "messages",
    "protocol",
    "session",
    "rooms",
    "backoff",
    "exceptions",
    "client_types",
]
OPTIONAL_CORE = ["clienthello"]
FORBIDDEN = {"asyncio", "ssl", "socket", "time", "structlog"}

CORE_FILES = [PACKAGE / f"{name}.py" for name in CORE] + [
    path for name in OPTIONAL_CORE if (path := PACKAGE / f"{name}.py").exists()
]


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, anywhere in the file (also inside functions)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x, from .frames import y
                base = "securemsg" + (f".{node.module}" if node.module else "")
                found.update(f"{base}.{alias.name}" for alias in node.names)
                found.add(base)
            elif node.module:
                found.add(node.module)
                if node.module == "securemsg":
                    found.update(f"securemsg.{alias.name}" for alias in node.names)
    return found


def test_every_core_module_exists() -> None:
    for name in CORE:
        assert (PACKAGE / f"{name}.py").is_file(), name


@pytest.mark.parametrize("path", CORE_FILES, ids=lambda path: path.stem)
def test_core_modules_import_no_io_clock_or_logging(path: Path) -> None:
    roots = {module.split(".")[0] for module in imported_modules(path)}
    assert not roots & FORBIDDEN, f"{path.name} imports {sorted(roots & FORBIDDEN)}"


@pytest.mark.parametrize("path", CORE_FILES, ids=lambda path: path.stem)
def test_core_modules_import_only_other_core_modules_of_the_package(path: Path) -> None:
    core = {f"securemsg.{name}" for name in CORE + OPTIONAL_CORE}
    ours = {m for m in imported_modules(path) if m.split(".")[0] == "securemsg"}
    ours.discard("securemsg")
    assert ours <= core, f"{path.name} imports {sorted(ours - core)}"


def test_the_checker_sees_every_spelling_of_an_import(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import os.path\n"
        "import asyncio as aio\n"
        "from time import monotonic\n"
        "from . import log\n"
        "from securemsg import server\n"
        "def f():\n"
        "    import socket\n",
        encoding="utf-8",
    )
    found = imported_modules(sample)
    assert {"os.path", "asyncio", "time", "socket", "securemsg.log", "securemsg.server"} <= found
