"""The import rules of docs/architecture.md, read with ``ast`` (not run) from the source.

- ``core/`` is sans-I/O: no asyncio, ssl, socket, time or structlog, and of the package only
  ``core/`` and ``errors``.
- ``server/`` never imports ``client/``, nor ``client/`` ``server/``; only ``cli/`` and
  ``bench/`` see both. The edges (``config``, ``log``, ``tls/``, ...) see neither.
- No import cycles between the package's modules, counting every import (also those inside
  functions and under ``TYPE_CHECKING``): a cycle is a cycle, however late it is resolved.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "securemsg"
FORBIDDEN_IN_CORE = {"asyncio", "ssl", "socket", "time", "structlog"}


def module_name(path: Path) -> str:
    if not path.is_relative_to(ROOT):
        return path.stem
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def wing(module: str) -> str:
    """``securemsg.core.frames`` -> ``core``; a top-level module is its own wing."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, anywhere in the file (also inside functions)."""
    package = module_name(path).rsplit(".", 0 if path.name == "__init__.py" else 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x, from .frames import y
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base += f".{node.module}" if node.module else ""
            else:
                base = node.module or ""
            found.add(base)
            # `from securemsg.core import frames` imports the module securemsg.core.frames.
            found.update(
                f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES
            )
    return found


def package_imports(path: Path) -> set[str]:
    """The package's own modules that ``path`` imports (a package's ``__init__`` excluded
    when a module of it is named: importing ``securemsg.core.frames`` is not a use of
    ``securemsg.core``)."""
    ours = {m for m in imported_modules(path) if m in MODULES}
    return {m for m in ours if not any(other.startswith(m + ".") for other in ours)}


CORE = sorted(name for name in MODULES if wing(name) == "core")


def test_the_wings_exist_and_core_holds_the_session_rules() -> None:
    wings = {wing(name) for name in MODULES}
    assert {"core", "server", "client", "tls", "cli", "bench"} <= wings
    for module in ("connection", "server_session", "client_session", "delivery", "frames"):
        assert f"securemsg.core.{module}" in MODULES


@pytest.mark.parametrize("module", CORE)
def test_core_modules_import_no_io_clock_or_logging(module: str) -> None:
    roots = {name.split(".")[0] for name in imported_modules(MODULES[module])}
    assert not roots & FORBIDDEN_IN_CORE, f"{module} imports {sorted(roots & FORBIDDEN_IN_CORE)}"


@pytest.mark.parametrize("module", CORE)
def test_core_modules_import_only_core_and_errors(module: str) -> None:
    allowed = {"securemsg.errors", "securemsg.core"}
    outside = {m for m in package_imports(MODULES[module]) if wing(m) != "core"} - allowed
    assert not outside, f"{module} imports {sorted(outside)}"


# Who may import which wing. The edges (config, log, errors, runner, busypoll, tls) serve
# everyone.
MAY_NOT_IMPORT = {
    "server": {"client", "cli", "bench"},
    "client": {"server", "cli", "bench"},
    "tls": {"server", "client", "cli", "bench"},
    "core": {"server", "client", "tls", "cli", "bench"},
}
EDGES = [
    "securemsg.config",
    "securemsg.log",
    "securemsg.errors",
    "securemsg.runner",
    "securemsg._compiled",
    "securemsg.busypoll",
]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_each_wing_imports_only_what_it_may(module: str) -> None:
    forbidden = MAY_NOT_IMPORT.get(wing(module), set())
    if module in EDGES:
        forbidden = {"server", "client", "cli", "bench"}
    bad = sorted(m for m in package_imports(MODULES[module]) if wing(m) in forbidden)
    assert not bad, f"{module} imports {bad}"


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_no_module_of_the_package_imports_itself_through_others() -> None:
    graph = {name: package_imports(path) - {name} for name, path in MODULES.items()}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_checker_sees_every_spelling_of_an_import(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import os.path\n"
        "import asyncio as aio\n"
        "from time import monotonic\n"
        "from securemsg.core import frames\n"
        "from securemsg import server\n"
        "def f():\n"
        "    import socket\n",
        encoding="utf-8",
    )
    found = {m for m in imported_modules(sample)}
    assert {"os.path", "asyncio", "time", "socket", "securemsg.core.frames"} <= found
    assert "securemsg.server" in found


def loaded_after(statement: str) -> set[str]:
    """The modules a fresh interpreter holds after running ``statement``."""
    code = f"import sys\n{statement}\nprint('\\n'.join(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    return set(result.stdout.split())


def test_importing_securemsg_does_not_load_the_server() -> None:
    loaded = loaded_after("import securemsg")
    assert not {m for m in loaded if m.startswith(("securemsg.server", "securemsg.cli"))}
    assert "prompt_toolkit" not in loaded
    assert "OpenSSL" not in loaded  # pyOpenSSL is for the datagram channel only


def test_the_tls_client_does_not_load_pyopenssl_and_the_datagram_client_not_the_server() -> None:
    assert "OpenSSL" not in loaded_after("import securemsg.client.client, securemsg.sync")
    loaded = loaded_after("import securemsg.datagram")
    assert "OpenSSL" in loaded
    assert not {m for m in loaded if m.startswith(("securemsg.server", "securemsg.cli."))}


def test_the_server_command_loads_neither_the_client_nor_the_chat_nor_the_bench() -> None:
    loaded = loaded_after(
        "from securemsg.cli.main import parse_args\n"
        "parse_args(['server', '--cert', 'c.pem', '--key', 'k.pem'])\n"
        "import securemsg.server.server"  # what the server command runs
    )
    assert "securemsg.server.server" in loaded
    bad = {m for m in loaded if m.startswith(("securemsg.client", "securemsg.bench."))}
    assert not bad
    assert "prompt_toolkit" not in loaded
    # Metrics are off unless --metrics-port is given: their library is not loaded then.
    assert "prometheus_client" not in loaded
    # The DTLS listener loads pyOpenSSL when it starts (and never with datagram_port off).
    assert "OpenSSL" not in loaded
    assert "securemsg.server.datagram" not in loaded
    # Nor is NATS without --cluster: the single server needs no cluster code or library.
    assert not {m for m in loaded if m.startswith(("nats", "securemsg.server.cluster"))}


def test_a_cluster_node_loads_nats_only_through_the_cluster_package() -> None:
    loaded = loaded_after(
        "from securemsg.config import ServerConfig\n"
        "from securemsg.server.server import Server\n"
        "Server(ServerConfig(cluster='nats://127.0.0.1:4222'), ssl_context=__import__('ssl')"
        ".create_default_context())"
    )
    assert {"nats", "securemsg.server.cluster", "securemsg.server.cluster.link"} <= loaded
    # NATS is the server wing's business: nothing outside it imports it.
    for module, path in MODULES.items():
        if wing(module) != "server" or ".cluster" not in module:
            roots = {name.split(".")[0] for name in imported_modules(path)}
            assert "nats" not in roots, module
