"""The optional compiled core (securemsg/_compiled.py): a build that does not match what is
running is never loaded; securemsg says why in one line and runs as pure Python.

(A real build is made and tested by .ci/run: bench/compile.py, then the core, server,
client and end-to-end tests of the compiled parts on it. One pitfall of compiled classes is
checked here on the pure build.)"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import securemsg

PACKAGE = Path(securemsg.__file__).resolve().parent
CHECK = "import securemsg.core.delivery as d; print(type(d.__loader__).__name__)"


def _run(build: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, SECUREMSG_COMPILED=str(build))
    return subprocess.run(
        [sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=60
    )


def _manifest(build: Path, *, sha256: str, python: str = sys.implementation.cache_tag) -> None:
    build.mkdir(parents=True, exist_ok=True)
    (build / "group__mypyc.so").write_bytes(b"not a library")
    (build / "delivery.so").write_bytes(b"not a library")
    manifest = {
        "python": python,
        "group": {"name": "group__mypyc", "file": "group__mypyc.so"},
        "modules": {
            "securemsg.core.delivery": {
                "file": "delivery.so",
                "source": "securemsg/core/delivery.py",
                "sha256": sha256,
            }
        },
    }
    (build / "manifest.json").write_text(json.dumps(manifest))


def _current_hash() -> str:
    return hashlib.sha256((PACKAGE / "core" / "delivery.py").read_bytes()).hexdigest()


def test_a_build_of_other_sources_is_not_loaded(tmp_path: Path) -> None:
    _manifest(tmp_path, sha256="0" * 64)
    done = _run(tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "SourceFileLoader"  # pure Python
    [line] = done.stderr.strip().splitlines()  # one line, no traceback
    assert "securemsg/core/delivery.py changed since the build" in line
    assert line.endswith("running pure Python")


def test_a_build_for_another_python_is_not_loaded(tmp_path: Path) -> None:
    _manifest(tmp_path, sha256=_current_hash(), python="cpython-27")
    done = _run(tmp_path)
    assert done.stdout.strip() == "SourceFileLoader"
    assert "was made for cpython-27" in done.stderr


def test_no_build_where_the_variable_points_runs_pure_python(tmp_path: Path) -> None:
    done = _run(tmp_path / "nothing-here")
    assert done.stdout.strip() == "SourceFileLoader"
    assert "no readable build" in done.stderr


def test_a_current_build_is_what_gets_loaded(tmp_path: Path) -> None:
    # The finder takes the build's file: here a fake one, so loading it must fail, and
    # that failure is the proof that the compiled file, not the source, was chosen.
    _manifest(tmp_path, sha256=_current_hash())
    done = _run(tmp_path)
    assert done.returncode != 0
    assert "delivery.so" in done.stderr


def _compiled_module_names() -> list[str]:
    """The modules bench/compile.py compiles (its MODULES), as module names."""
    script = PACKAGE.parent / "bench" / "compile.py"
    spec = importlib.util.spec_from_file_location("securemsg_compile_script", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return [source.removesuffix(".py").replace("/", ".") for source in module.MODULES]


def _subclasses(cls: type) -> list[type]:
    found = []
    for sub in cls.__subclasses__():
        found += [sub, *_subclasses(sub)]
    return found


def test_no_python_subclass_of_a_compiled_class_overrides_a_class_attribute() -> None:
    """Compiled, a native class's attribute is read from the instance, so a class attribute
    of the same name in a Python subclass is not seen: ``Broker.opens_later``, overridden by
    the cluster's registry, read False, and a compiled cluster node opened its sessions
    without the cluster. Checked here on the pure build, before any build is made."""
    compiled = _compiled_module_names()
    for info in pkgutil.walk_packages(securemsg.__path__, "securemsg."):
        if info.name.endswith("__main__"):  # runs the command line
            continue
        with contextlib.suppress(ImportError):  # an optional extra that is not installed
            importlib.import_module(info.name)
    offenders = []
    for name in compiled:
        module = importlib.import_module(name)
        classes = [c for c in vars(module).values() if isinstance(c, type)]
        # Protocols are types only, not native classes.
        native = (
            c for c in classes if c.__module__ == name and not getattr(c, "_is_protocol", False)
        )
        for cls in native:
            for sub in _subclasses(cls):
                if sub.__module__ in compiled or not sub.__module__.startswith("securemsg"):
                    continue
                for attr, value in vars(sub).items():
                    plain = not (attr.startswith("__") or callable(value))
                    if plain and not isinstance(value, property) and hasattr(cls, attr):
                        offenders.append(f"{sub.__module__}.{sub.__qualname__}.{attr}")
    assert not offenders, f"set these per instance (in __init__) instead: {offenders}"
