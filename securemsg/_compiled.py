"""The optional compiled core (``python bench/compile.py``), loaded in place of the sources.

With ``SECUREMSG_COMPILED`` naming a build folder, :func:`install` puts a finder first on
``sys.meta_path`` that loads the modules listed in the build's manifest from their compiled
files. Nothing is loaded from a build made for another Python or from sources that changed
since (their hashes differ): securemsg then runs as pure Python and says so in one line on
stderr. Without the variable nothing happens, and importing costs nothing.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = ["ENV", "install", "mypyc_attr"]

try:  # mypyc reads this decorator when it compiles a module (bench/compile.py)
    from mypy_extensions import mypyc_attr
except ImportError:  # pure Python without mypy installed: the decorator means nothing

    def mypyc_attr(*args: Any, **kwargs: Any) -> Any:  # type: ignore[misc]
        return lambda cls: cls


#: The environment variable that names the build folder.
ENV = "SECUREMSG_COMPILED"
_PACKAGE = Path(__file__).resolve().parent


class _Finder:
    """Finds the compiled modules of one build, by full name."""

    def __init__(self, files: dict[str, Path]) -> None:
        self.files = files

    def find_spec(
        self, name: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        file = self.files.get(name)
        if file is None:
            return None
        loader = importlib.machinery.ExtensionFileLoader(name, str(file))
        return importlib.util.spec_from_file_location(name, file, loader=loader)


def _files(directory: Path) -> dict[str, Path] | str:
    """The module files of the build, or why it cannot be used (one sentence)."""
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
    except (OSError, ValueError) as exc:
        return f"no readable build in {directory} ({exc.__class__.__name__})"
    if manifest.get("python") != sys.implementation.cache_tag:
        return f"the build in {directory} was made for {manifest.get('python')}"
    files = {manifest["group"]["name"]: directory / manifest["group"]["file"]}
    for name, entry in manifest["modules"].items():
        source = _PACKAGE.parent / entry["source"]
        try:
            current = hashlib.sha256(source.read_bytes()).hexdigest()
        except OSError:
            return f"{entry['source']} is missing"
        if current != entry["sha256"]:
            return f"{entry['source']} changed since the build in {directory} was made"
        files[name] = directory / entry["file"]
    missing = [str(path) for path in files.values() if not path.is_file()]
    if missing:
        return f"the build in {directory} lacks {missing[0]}"
    return files


def install() -> None:
    """Load the compiled modules named by ``SECUREMSG_COMPILED``, if any and if current."""
    directory = os.environ.get(ENV)
    if not directory or any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    files = _files(Path(directory).resolve())
    if isinstance(files, str):
        # One line on stderr, not a traceback or a warning with its source line: the
        # server and the clients still work, a little slower.
        sys.stderr.write(f"securemsg: {ENV}: {files}; running pure Python\n")
        return
    sys.meta_path.insert(0, _Finder(files))
