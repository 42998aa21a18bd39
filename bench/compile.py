"""Build the optional compiled core: the hot-path modules compiled with mypyc.

    python bench/compile.py [--out build/compiled]

Then run anything with ``SECUREMSG_COMPILED=build/compiled`` in the environment (the
server, the clients, the tests, the benchmarks): ``securemsg`` loads these modules from the
build instead of their sources, and falls back to pure Python, with a warning, when the
build does not match the sources any more (see ``securemsg/_compiled.py``). The sources are
never touched: the build goes to its own folder with a manifest of the source hashes.

Needs mypy (the ``test`` extra) and a C compiler. About 55 s on a 2-core machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: The modules compiled: what runs for every message and every connection on the server (the
#: sans-I/O core's rules, the broker's route, the TLS layer, the connection, the accept), and
#: the client's core and connection. `core/messages` holds msgspec structs mypyc cannot
#: compile; the client's mailbox (futures, a generic class, exceptions raised from others)
#: failed tests when compiled by mypyc 2.4. What compiled code must keep in
#: mind: a native class's attributes are read from its instances (an interpreted subclass's
#: class attribute is not seen), and a class subclassed in Python needs
#: ``mypyc_attr(allow_interpreted_subclasses=True)``.
MODULES = (
    "securemsg/core/frames.py",
    "securemsg/core/clienthello.py",
    "securemsg/core/readbuffer.py",
    "securemsg/core/delivery.py",
    "securemsg/core/rooms.py",
    "securemsg/core/connection.py",
    "securemsg/core/gatekeeper.py",
    "securemsg/core/server_session.py",
    "securemsg/core/client_session.py",
    "securemsg/busypoll.py",
    "securemsg/server/broker.py",
    "securemsg/server/tlstransport.py",
    "securemsg/server/connection.py",
    "securemsg/server/incoming.py",
    "securemsg/server/timerwheel.py",
    "securemsg/client/connection.py",
)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build(out: Path) -> dict[str, object]:
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    with tempfile.TemporaryDirectory(prefix="securemsg-mypyc-") as tmp:
        work = Path(tmp)
        shutil.copytree(ROOT / "securemsg", work / "securemsg")
        command = [sys.executable, "-m", "mypyc", *MODULES]
        done = subprocess.run(command, cwd=work, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise SystemExit(f"mypyc failed: {tail[0]}")
        groups = list(work.glob(f"*__mypyc{suffix}"))
        if len(groups) != 1:
            raise SystemExit(f"mypyc made {len(groups)} shared libraries, expected one")
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        shutil.copy2(groups[0], out / groups[0].name)
        modules: dict[str, dict[str, str]] = {}
        for source in MODULES:
            relative = Path(source).with_suffix(suffix)
            (out / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(work / relative, out / relative)
            name = source.removesuffix(".py").replace("/", ".")
            digest = _digest(ROOT / source)
            modules[name] = {"file": str(relative), "source": source, "sha256": digest}
    manifest: dict[str, object] = {
        "python": sys.implementation.cache_tag,
        "group": {"name": groups[0].name.removesuffix(suffix), "file": groups[0].name},
        "modules": modules,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "compiled")
    args = parser.parse_args()
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        raise SystemExit("no C compiler (cc or gcc) on PATH: mypyc needs one")
    try:
        import mypyc  # noqa: F401
    except ImportError:
        raise SystemExit("mypyc is not installed: pip install -e '.[test]' brings it") from None
    out = args.out.resolve()
    build(out)
    print(f"compiled {len(MODULES)} modules into {out}")
    # An absolute path: a relative one would be resolved from each process's own directory.
    print(f"use it: SECUREMSG_COMPILED={out} securemsg server ...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
